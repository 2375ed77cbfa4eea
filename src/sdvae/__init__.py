"""sdvae: the Stable-Diffusion-family AutoencoderKL on plain PyTorch, numerically equal to diffusers."""

from ._version import __version__
from .checkpoint.convert import DropReport, load_weights
from .checkpoint.loading import load_decoder, load_encoder
from .data.dataset import LatentDataset
from .fast import fast_path
from .model.config import VaeConfig
from .model.distribution import DiagonalGaussian
from .vae.decoder import VaeDecoder
from .vae.encoder import VaeEncoder

__all__ = ["__version__", "VaeConfig", "VaeEncoder", "VaeDecoder", "DiagonalGaussian", "LatentDataset",
           "DropReport", "load_encoder", "load_decoder", "load_weights", "fast_path"]
