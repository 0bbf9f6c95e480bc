"""Backbones, model assembly, plugin host, configs, checkpoints and the command line."""
