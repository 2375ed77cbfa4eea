"""sdvae: the Stable-Diffusion-family AutoencoderKL on plain PyTorch, numerically equal to diffusers."""

__version__ = "0.1.0"

from .config import VaeConfig
from .dataset import LatentDataset
from .decoder import VaeDecoder
from .distribution import DiagonalGaussian
from .encoder import VaeEncoder
from .fast import fast_path
from .loading import load_decoder, load_encoder
from .weights import DropReport

__all__ = ["VaeConfig", "VaeEncoder", "VaeDecoder", "DiagonalGaussian", "LatentDataset", "DropReport",
           "load_encoder", "load_decoder", "fast_path"]
