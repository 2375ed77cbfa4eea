"""Sampling and latent scaling against diffusers: generator sampling, per-sample seeds, encode/decode_with_scaling."""

from __future__ import annotations

import pytest
import torch
from reference import loaded_from, random_images, reference_vae, rel_err

from sdvae import DiagonalGaussian, VaeConfig
from sdvae.model.config import PRESETS
from sdvae.model.distribution import seeded_noise

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}

# SPEC.md's family table, written out as the external truth: (scaling_factor, shift_factor, latents_mean,
# latents_std); a shift of "none" is 0.
SCALING = {
    "sd15": (0.18215, 0.0, None, None),
    "sd2": (0.18215, 0.0, None, None),
    "sdxl": (0.13025, 0.0, None, None),
    "sd3": (1.5305, 0.0609, None, None),
    "flux": (0.3611, 0.1159, None, None),
    "playground": (0.5, 0.0, [-1.6574, 1.886, -1.383, 2.5155], [8.4927, 5.9022, 6.5498, 5.2299]),
    "cogview": (1.0, 0.0, None, None),
}
# FLUX.2 and Qwen-Image are checked against their pipelines' own transforms (test_flux2.py, test_qwenimage.py).
KL_FAMILIES = [name for name in PRESETS if name not in ("flux2", "qwenimage")]
# Families whose presets differ only in scaling fields share one reference model.
ARCHITECTURE = {"sd15": "sd15", "sd2": "sd15", "sdxl": "sd15", "playground": "sd15",
                "sd3": "sd3", "flux": "sd3", "cogview": "cogview"}


def family_config(family: str) -> VaeConfig:
    """The preset; CogView's 400M-parameter widths are narrowed (its scaling, depth and layout are kept)."""
    config = VaeConfig.preset(family)
    if family == "cogview":
        config = config.replace(block_out_channels=(32, 64, 64, 64))
    return config


def reference_noise(seed: int, shape) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def diffusers_scale(z: torch.Tensor, family: str) -> torch.Tensor:
    scale, shift, mean, std = SCALING[family]
    if mean is None:
        return (z - shift) * scale
    mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(z.dtype) for v in (mean, std))  # (float32, as pipelines)
    return (z - mean) * scale / std


def diffusers_unscale(z: torch.Tensor, family: str) -> torch.Tensor:
    scale, shift, mean, std = SCALING[family]
    if mean is None:
        return z / scale + shift
    mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(z.dtype) for v in (mean, std))  # (float32, as pipelines)
    return z * std / scale + mean


@pytest.fixture(scope="module")
def models():
    """`models(family, dtype)`: a diffusers reference and our encoder/decoder with its weights, built once each."""
    refs, ours = {}, {}

    def get(family: str, dtype: torch.dtype = torch.float64):
        arch = ARCHITECTURE[family]
        if (arch, dtype) not in refs:
            refs[arch, dtype] = reference_vae(family_config(arch), dtype=dtype)
        ref = refs[arch, dtype]
        if (family, dtype) not in ours:
            ours[family, dtype] = loaded_from(ref, family_config(family), dtype)
        return ref, *ours[family, dtype]

    return get


@pytest.fixture(scope="module")
def encoded(models):
    """`encoded(family)`: images and diffusers' latent_dist of them, computed once per reference model."""
    images = random_images(2, 8, 16, dtype=torch.float64)
    cache = {}

    def get(family: str):
        ref, enc, _ = models(family)
        if ARCHITECTURE[family] not in cache:
            with torch.no_grad():
                cache[ARCHITECTURE[family]] = ref.encode(images).latent_dist
        return images, cache[ARCHITECTURE[family]], enc

    return get


def test_scaling_table_covers_every_preset():
    assert set(SCALING) == set(KL_FAMILIES) == set(ARCHITECTURE)


# --- sample(generator=...) ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_with_generator_matches_diffusers(models, dtype):
    ref, enc, _ = models("sd15", dtype)
    x = random_images(2, 8, 16, dtype=dtype)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        got = enc.encode(x).sample(generator=torch.Generator().manual_seed(3))
    assert got.dtype == dtype
    assert rel_err(got, want) <= TOLERANCE[dtype]


def test_sample_with_generator_list_matches_diffusers(models):
    ref, enc, _ = models("sd15")
    x = random_images(2, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.sample(generator=[torch.Generator().manual_seed(s) for s in (4, 9)])
        got = enc.encode(x).sample(generator=[torch.Generator().manual_seed(s) for s in (4, 9)])
    assert rel_err(got, want) <= 1e-12


# --- sample(seed=...) ---

def test_int_seed_gives_sample_i_the_seed_plus_i(models):
    ref, enc, _ = models("sd15")
    x = random_images(2, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = enc.encode(x).sample(seed=5)
    shape = want.mean.shape[1:]
    eps = torch.stack([reference_noise(5, shape), reference_noise(6, shape)]).double()
    assert rel_err(got, want.mean + want.std * eps) <= 1e-12


def test_seed_list_gives_one_seed_per_sample(models):
    ref, enc, _ = models("sd15")
    x = random_images(2, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = enc.encode(x).sample(seed=[11, 3])
    shape = want.mean.shape[1:]
    eps = torch.stack([reference_noise(11, shape), reference_noise(3, shape)]).double()
    assert rel_err(got, want.mean + want.std * eps) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seeded_noise_is_the_reference_noise_in_any_batch_position_and_dtype(dtype):
    shape = (4, 3, 5)
    want = reference_noise(9, shape)
    unit = lambda batch: DiagonalGaussian(torch.zeros(batch, 2 * shape[0], *shape[1:], dtype=dtype))  # noqa: E731
    alone = unit(1).sample(seed=9)[0]
    first = unit(3).sample(seed=9)[0]
    last = unit(3).sample(seed=7)[2]
    middle = unit(3).sample(seed=[1, 9, 2])[1]
    direct = seeded_noise([0, 9, 5], shape, dtype=dtype)[1]
    for got in (alone, first, last, middle, direct):
        assert got.dtype == dtype
        assert torch.equal(got, want.to(dtype))


def test_encoded_sample_noise_depends_only_on_its_seed(models):
    """The same image alone, at another batch position, and in float32: (sample - mean) / std is the same noise."""
    ref, enc, _ = models("sd15")
    _, enc32, _ = models("sd15", torch.float32)
    image = random_images(1, 8, 16, seed=5, dtype=torch.float64)
    others = random_images(2, 8, 16, seed=6, dtype=torch.float64)
    noises = []
    with torch.no_grad():
        for encoder, batch, seeds, i in [(enc, image, [9], 0), (enc, torch.cat([others, image]), [1, 2, 9], 2),
                                         (enc, torch.cat([image, others]), [9, 1, 2], 0),
                                         (enc32, image.float(), [9], 0)]:
            dist = encoder.encode(batch)
            noises.append(((dist.sample(seed=seeds) - dist.mean) / dist.std)[i])
        shape = ref.encode(image).latent_dist.mean.shape[1:]
    want = reference_noise(9, shape)
    for noise, tol in zip(noises, [1e-12, 1e-12, 1e-12, 1e-5]):
        assert rel_err(noise, want) <= tol


def test_wrong_number_of_seeds_raises():
    dist = DiagonalGaussian(torch.zeros(2, 8, 2, 3))
    with pytest.raises(ValueError, match="seeds"):
        dist.sample(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="seeds"):
        dist.sample(seed=[1])


def test_generator_and_seed_together_raise():
    dist = DiagonalGaussian(torch.zeros(1, 8, 2, 3))
    with pytest.raises(ValueError, match="generator"):
        dist.sample(torch.Generator().manual_seed(0), seed=0)


# --- encode_with_scaling / decode_with_scaling, every preset ---

@pytest.mark.parametrize("family", KL_FAMILIES)
def test_encode_with_scaling_mode_is_the_scaled_diffusers_mean(encoded, family):
    x, dist, enc = encoded(family)
    want = diffusers_scale(dist.mode(), family)
    with torch.no_grad():
        got = enc.encode_with_scaling(x, mode=True)
    assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("family", KL_FAMILIES)
def test_encode_with_scaling_seed_is_the_scaled_seeded_sample(encoded, family):
    x, dist, enc = encoded(family)
    with torch.no_grad():
        got = enc.encode_with_scaling(x, seed=7)
    shape = dist.mean.shape[1:]
    eps = torch.stack([reference_noise(7, shape), reference_noise(8, shape)]).double()
    assert rel_err(got, diffusers_scale(dist.mean + dist.std * eps, family)) <= 1e-12


@pytest.mark.parametrize("family", KL_FAMILIES)
def test_encode_with_scaling_generator_is_the_scaled_diffusers_sample(encoded, family):
    x, dist, enc = encoded(family)
    want = diffusers_scale(dist.sample(generator=torch.Generator().manual_seed(1)), family)
    with torch.no_grad():
        got = enc.encode_with_scaling(x, generator=torch.Generator().manual_seed(1))
    assert rel_err(got, want) <= 1e-12


def test_encode_with_scaling_refuses_mode_with_seed_or_generator(models):
    _, enc, _ = models("sd15")
    x = random_images(1, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        enc.encode_with_scaling(x, seed=7, mode=True)
    with pytest.raises(ValueError, match="mode"):
        enc.encode_with_scaling(x, generator=torch.Generator().manual_seed(0), mode=True)


@pytest.mark.parametrize("family", KL_FAMILIES)
def test_decode_with_scaling_is_diffusers_decode_of_the_unscaled_latents(models, family):
    ref, _, dec = models(family)
    z = torch.randn(2, dec.config.latent_channels, 1, 2, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    with torch.no_grad():
        want = ref.decode(diffusers_unscale(z, family)).sample
        got = dec.decode_with_scaling(z)
    assert got.shape == (2, 3, 8, 16)
    assert rel_err(got, want) <= 1e-12



def test_seeds_accept_numpy_and_torch_ints_and_refuse_bools_floats_and_overflow():
    import numpy as np

    dist = DiagonalGaussian(torch.zeros(2, 2, 3, 3))
    assert torch.equal(dist.sample(seed=np.int64(3)), dist.sample(seed=3))
    assert torch.equal(dist.sample(seed=torch.tensor(3)), dist.sample(seed=3))
    assert torch.equal(dist.sample(seed=torch.tensor([3, 9])), dist.sample(seed=[3, 9]))
    with pytest.raises(TypeError):
        dist.sample(seed=True)
    for odd in (3.0, "3", [3.0, 4.0]):
        with pytest.raises(TypeError, match="seed must be an int or a sequence of ints"):
            dist.sample(seed=odd)
    with pytest.raises(ValueError, match="64 bits"):
        dist.sample(seed=2**64)


def test_one_generator_in_a_list_is_a_single_generator_as_in_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    dist = DiagonalGaussian(torch.zeros(2, 2, 3, 3))
    want = randn_tensor((2, 1, 3, 3), generator=[torch.Generator().manual_seed(5)], device=torch.device("cpu"))
    assert torch.equal(dist.sample(generator=[torch.Generator().manual_seed(5)]), want)
