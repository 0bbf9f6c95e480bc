"""mu-VLA through the plugin interface: retrieval-built weakly aligned corpus, pairs reader, head."""
