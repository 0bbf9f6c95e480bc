"""BLIP through the plugin interface: ITC/ITM/LM head, retrieval, CapFilt."""
