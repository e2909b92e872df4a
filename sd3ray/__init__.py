"""sd3ray: SD3-style MM-DiT rectified-flow training on Ray."""

__version__ = "0.1.0"
