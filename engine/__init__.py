"""The engine: training loop, evaluation, metrics and the embedded demo."""
