"""Every weight sd3ray trains: the SD3 MM-DiT, its embeddings and the byte-level text encoder. Imports neither ray
nor mlflow."""

from sd3ray.model.denoiser import Conditioning, Denoiser, count_parameters
from sd3ray.model.mmdit import MMDiT
from sd3ray.model.text_encoder import TextEncoder

__all__ = ["Conditioning", "Denoiser", "MMDiT", "TextEncoder", "count_parameters"]
