"""The benchmark: speed and memory tables, JSON results beside this package."""
