"""sdvae against diffusers with fresh random weights: every family config, float32 and float64, odd sizes."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from reference import loaded_from, random_images, reference_vae, rel_err

from sdvae import VaeConfig, VaeEncoder, load_weights
from sdvae.model.config import PRESETS

# Against diffusers in float64, the exact result: diffusers' own float32 result is up to 9e-6 from it (measured on
# an AVX2 CPU), so two float32 results may differ by more than either's error.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
# (batch, height, width): not multiples of 64, and one not a multiple of 8.
SHAPES = [(1, 72, 40), (2, 37, 50)]


@pytest.fixture(scope="module", params=list(PRESETS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pair(family):
    """A diffusers reference in float64 and our encoder/decoder loaded from its state dict."""
    config = VaeConfig.preset(family)
    ref = reference_vae(config, dtype=torch.float64)
    return ref, *loaded_from(ref, config, torch.float64)


@pytest.fixture(scope="module")
def expected(pair):
    """diffusers' float64 outputs for the module's inputs, computed once and checked against in every dtype."""
    ref = pair[0]

    frames = isinstance(ref, AutoencoderKLQwenImage)  # (diffusers runs it on one-frame videos [B, C, 1, H, W])

    @functools.cache
    def encode(batch: int, height: int, width: int):
        x = random_images(batch, height, width, dtype=torch.float64)
        with torch.no_grad():
            if frames:
                return DiagonalGaussianDistribution(ref.encode(x[:, :, None]).latent_dist.parameters[:, :, 0])
            return ref.encode(x).latent_dist

    @functools.cache
    def decode():
        z = latents(pair[2].config.latent_channels, torch.float64)
        with torch.no_grad():
            return ref.decode(z[:, :, None]).sample[:, :, 0] if frames else ref.decode(z).sample

    return SimpleNamespace(encode=encode, decode=decode)


def latents(channels: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, channels, 3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,height,width", SHAPES)
def test_encoder_matches_diffusers(pair, expected, dtype, batch, height, width):
    enc = pair[1].to(dtype)
    x = random_images(batch, height, width, dtype=dtype)
    want = expected.encode(batch, height, width)
    with torch.no_grad():
        params = enc(x)
        got = enc.encode(x)
    assert params.shape == (batch, 2 * enc.config.latent_channels, height // 8, width // 8)
    assert params.dtype == dtype
    tol = TOLERANCE[dtype]
    assert rel_err(params, want.parameters) <= tol
    assert rel_err(got.mean, want.mean) <= tol
    assert rel_err(got.logvar, want.logvar) <= tol
    assert rel_err(got.std, want.std) <= tol
    assert rel_err(got.var, want.var) <= tol
    assert rel_err(got.mode(), want.mode()) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_matches_diffusers(pair, expected, dtype):
    dec = pair[2].to(dtype)
    with torch.no_grad():
        got = dec.decode(latents(dec.config.latent_channels, dtype))
    assert got.shape == (2, dec.config.out_channels, 24, 40)
    assert rel_err(got, expected.decode()) <= TOLERANCE[dtype]


def test_logvar_is_clamped_like_diffusers():
    config = VaeConfig.preset("sd15")
    ref = reference_vae(config, dtype=torch.float64)
    enc = VaeEncoder(config).double()
    with torch.no_grad():
        ref.quant_conv.bias[4:] = torch.tensor([-100.0, 100.0, 0.0, 25.0], dtype=torch.float64)
    load_weights(enc, ref.state_dict())
    x = random_images(1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        got, want = enc.encode(x), ref.encode(x).latent_dist
    assert got.logvar.min() == -30 and got.logvar.max() == 20
    assert rel_err(got.logvar, want.logvar) <= 1e-12
    assert rel_err(got.std, want.std) <= 1e-12


def test_large_image_matches_diffusers():
    """Large maps are where channels-last GroupNorm kernels lose precision (see sdvae.fast.groupnorm)."""
    config = VaeConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8)
    ref = reference_vae(config, seed=9)
    enc = VaeEncoder(config)
    load_weights(enc, ref.state_dict())
    x = random_images(1, 1024, 1024)
    with torch.no_grad():
        assert rel_err(enc(x), ref.encode(x).latent_dist.parameters) <= 1e-5


def test_group_norm_statistics_hold_on_large_offset_maps():
    from sdvae.fast.groupnorm import exact_group_norm as group_norm

    norm = torch.nn.GroupNorm(32, 128, eps=1e-6)
    x = (torch.randn(1, 128, 512, 512, generator=torch.Generator().manual_seed(0)) * 3 + 5)
    want = torch.nn.functional.group_norm(x.double(), 32, eps=1e-6)
    got = group_norm(norm, x.contiguous(memory_format=torch.channels_last))
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("family", ["sd15", "cogview"])
@pytest.mark.parametrize("band_pixels", [1, 150])  # one row per band; bands of a few rows that do not divide H
@pytest.mark.parametrize("batch", [1, 2])
def test_resnets_by_row_bands_match_diffusers(family, band_pixels, batch, monkeypatch):
    """Inference runs each resnet by row bands (sdvae.fast.bands): halos, band edges and the in-place residual; float32
    convs through Winograd (sdvae.fast.winograd) in pieces of two rows."""
    import sdvae.fast.bands
    import sdvae.fast.winograd

    monkeypatch.setattr(sdvae.fast.bands, "BAND_PIXELS", band_pixels)
    monkeypatch.setattr(sdvae.fast.winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(sdvae.fast.winograd, "MIN_WORK", 0)
    monkeypatch.setattr(sdvae.fast.winograd, "WORKSPACE_BYTES", 1)
    config = VaeConfig.preset(family).replace(norm_num_groups=8, block_out_channels=(16, 32, 32, 32))
    ref = reference_vae(config, dtype=torch.float64)
    enc, dec = loaded_from(ref, config, torch.float64)
    x = random_images(batch, 37, 50, dtype=torch.float64)
    z = torch.randn(batch, config.latent_channels, 5, 3, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        ref, enc, dec = ref.to(dtype), enc.to(dtype), dec.to(dtype)
        with torch.no_grad():
            assert rel_err(enc(x.to(dtype)), ref.encode(x.to(dtype)).latent_dist.parameters) <= TOLERANCE[dtype]
            assert rel_err(dec(z.to(dtype)), ref.decode(z.to(dtype)).sample) <= TOLERANCE[dtype]
