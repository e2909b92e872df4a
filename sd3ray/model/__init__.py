"""The SD3 MM-DiT and its embeddings. Imports neither ray nor mlflow."""

from sd3ray.model.denoiser import Denoiser, count_parameters
from sd3ray.model.mmdit import MMDiT

__all__ = ["Denoiser", "MMDiT", "count_parameters"]
