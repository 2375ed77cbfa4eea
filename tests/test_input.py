"""Bad input gets an error that names the shape; float16 overflow falls back to float32."""

from __future__ import annotations

import pytest
import torch
from reference import loaded_from, random_images, reference_vae, rel_err

from sdvae import VaeConfig, VaeEncoder, load_weights

SMALL = VaeConfig(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8)


@pytest.fixture(scope="module")
def models():
    ref = reference_vae(SMALL, seed=11)
    return ref, *loaded_from(ref, SMALL)


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 4, 16, 16), (1, 1, 3, 16, 16), (0, 3, 16, 16)])
def test_wrong_rank_channels_or_empty_batch_states_expected_and_given(models, shape):
    _, enc, _ = models
    with pytest.raises(ValueError, match=rf"\[B, 3, H, W\], B >= 1, got \[{', '.join(map(str, shape))}\]"):
        enc(torch.zeros(shape))


def test_too_small_and_integer_images_are_refused(models):
    _, enc, dec = models
    with pytest.raises(ValueError, match=r"\[1, 3, 3, 16\] is too small.*at least 4"):
        enc(torch.zeros(1, 3, 3, 16))
    with pytest.raises(TypeError, match="floating-point"):
        enc(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"latents of shape \[B, 4, H, W\], B >= 1, got \[1, 3, 2, 2\]"):
        dec(torch.zeros(1, 3, 2, 2))


def test_smallest_size_matches_diffusers(models):
    ref, enc, _ = models
    x = random_images(1, 4, 5)
    with torch.no_grad():
        assert rel_err(enc(x), ref.encode(x).latent_dist.parameters) <= 1e-5


def test_float16_overflow_is_recomputed_in_float32(models):
    ref, enc, _ = models
    loud = VaeEncoder(SMALL)
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    state["encoder.conv_in.weight"] *= 3e4  # activations around float16's limit of 65504 ...
    state["encoder.conv_in.bias"] += 6e4  # ... and past it; the GroupNorm after brings them back
    load_weights(loud, state)
    x = random_images(2, 16, 16)
    with torch.no_grad():
        want = loud(x)
        half = loud.half()
        assert not torch.isfinite(half._params(x.half())).all()
        with pytest.warns(RuntimeWarning, match="float16 overflowed"):
            got = half(x)
        with pytest.warns(RuntimeWarning, match="float16 overflowed"):
            tiled = half(x, tile_size=8)
    for result in (got, tiled):
        assert result.dtype == torch.float16 and torch.isfinite(result).all()
        assert rel_err(result, want) <= 1e-3
