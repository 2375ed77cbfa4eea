"""Which network a config builds: the AutoencoderKL one (`sdvae.model.network`) or the Wan one (`sdvae.model.wan`)."""

from __future__ import annotations

from torch import nn

from .config import VaeConfig
from .network import Decoder, Encoder
from .wan import WanDecoder, WanEncoder


def encoder_network(config: VaeConfig) -> nn.Module:
    return (WanEncoder if config.network == "wan" else Encoder)(config)


def decoder_network(config: VaeConfig) -> nn.Module:
    return (WanDecoder if config.network == "wan" else Decoder)(config)
