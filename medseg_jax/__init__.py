"""medseg_jax: data-parallel JAX training for 2D medical-image segmentation."""

__version__ = "0.1.0"
