"""The Experts Resampler: many expert tokens in, a fixed number of latents out."""

from prismkit.resampler.perceiver import PerceiverResampler

__all__ = ["PerceiverResampler"]
