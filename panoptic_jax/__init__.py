"""panoptic_jax: kMaX-DeepLab panoptic segmentation in JAX / Flax NNX."""

__version__ = "0.1.0"
