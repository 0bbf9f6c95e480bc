"""Residual adaptors inserted in every frozen vision block and language layer."""

from prismkit.adapters.residual import ResidualAdaptor

__all__ = ["ResidualAdaptor"]
