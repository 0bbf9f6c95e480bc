"""SimVLM through the plugin interface: conv image stems, the prefix-LM head, zero-shot generation."""
