"""The fast path is the default one: channels-last weights and activations, in-place SiLU and residual adds.

Not timed (speed lives in bench/); these checks make a regression to the slow path visible.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import loaded_from, random_images, reference_vae, rel_err
from torch.profiler import profile

from sdvae import VaeConfig, VaeDecoder, VaeEncoder, load_decoder, load_encoder, load_weights

SMALL = VaeConfig(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8)


def conv_inputs_layouts(module, x):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last))) for m in module.modules()
        if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return seen


def test_weights_and_activations_are_channels_last_by_default(tmp_path):
    reference_vae(SMALL).save_pretrained(tmp_path)
    for enc in (VaeEncoder(SMALL), load_encoder(tmp_path)):
        convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        assert all(conv_inputs_layouts(enc, random_images(1, 16, 24)))
    dec = VaeDecoder(SMALL)
    assert all(conv_inputs_layouts(dec, torch.randn(1, 4, 3, 5)))


def test_inference_uses_in_place_silu_and_residual_adds():
    enc = VaeEncoder(SMALL).eval()
    with torch.no_grad(), profile(record_shapes=True) as prof:
        enc(random_images(1, 16, 24))
    ops = {e.name for e in prof.events()}
    assert "aten::silu_" in ops and "aten::add_" in ops

    def largest_input(event) -> int:
        return max((torch.Size(s).numel() for s in event.input_shapes if s), default=0)

    activation = 32 * 16 * 24
    out_of_place = [e.name for e in prof.events() if e.name in ("aten::silu", "aten::add", "aten::group_norm")
                    and largest_input(e) >= activation]
    assert not out_of_place, out_of_place


def test_gradients_still_flow_through_the_encoder():
    enc = VaeEncoder(SMALL)
    x = random_images(1, 16, 16).requires_grad_()
    enc(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# default bands, bands of two rows at 128 px, and 64 px tiles
@pytest.mark.parametrize("family,band_pixels,tile_size", [("sd15", None, None), ("sd15", 300, None),
                                                          ("sd15", None, 64), ("sd3", None, None)])
def test_bfloat16_fast_path_is_closer_to_float32_than_diffusers_bfloat16(family, band_pixels, tile_size,
                                                                         monkeypatch):
    import sdvae.fast.bands

    if band_pixels is not None:
        monkeypatch.setattr(sdvae.fast.bands, "BAND_PIXELS", band_pixels)
    config = VaeConfig.preset(family)
    ref = reference_vae(config, seed=4)
    enc = VaeEncoder(config)
    load_weights(enc, ref.state_dict())
    x = random_images(1, 128, 128)  # large enough that the error is a property of the path, not of a few values
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mean
        # diffusers channels-last: its NCHW layout rounds alike, and on a CPU without native bfloat16 (AVX2) runs
        # emulated convs 40x slower still (18 s for one 128-channel conv at 128 px)
        theirs = copy.deepcopy(ref).to(torch.bfloat16, memory_format=torch.channels_last)
        theirs = theirs.encode(x.bfloat16().contiguous(memory_format=torch.channels_last)).latent_dist.mean
        got = enc.to(torch.bfloat16).encode(x, tile_size=tile_size).mean
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 0.97 * rel_err(theirs, want)  # GroupNorm+SiLU rounds once, diffusers' twice
    assert rel_err(got, want) <= 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_half_precision_group_norm_and_silu_round_once(dtype, inplace, monkeypatch):
    """Half-precision GroupNorm+SiLU is computed in float32 and rounded once (by chunks of rows, here several):
    the result is float64's rounded to `dtype`, where rounding the normalized map and then its SiLU would miss
    that on a large share of the values."""
    from sdvae.fast import groupnorm

    monkeypatch.setattr(groupnorm, "HALF_CHUNK", 1000)
    torch.manual_seed(5)
    norm = torch.nn.GroupNorm(4, 24, eps=1e-6).requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5), torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(2, 24, 13, 21) * 3 + 5).to(dtype).contiguous(memory_format=torch.channels_last)
    x[:, 3] = 7.0  # a constant channel: its variance 0
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(
        x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6)).to(dtype)
    with torch.no_grad():
        got = groupnorm.exact_group_norm(norm, x.clone() if inplace else x, silu=True, inplace=inplace)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    up, down = (torch.nextafter(want, torch.full_like(want, inf)) for inf in (float("inf"), float("-inf")))
    near_zero = (got.double() - want.double()).abs() < 1e-6  # float32's absolute error, seen in float16 there
    assert ((got == want) | (got == up) | (got == down) | near_zero).all()  # else never more than a last-bit flip
    assert (got != want).double().mean() < 2e-3  # float32 vs float64 arithmetic flips only near-ties


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_maps_with_constant_channels_stay_near_float32(dtype):
    """A band, tile or image in which a channel is constant (zero padding, a flat background, a 1x1 last tile) has
    variance 0 there: the statistics must merge it as such, not as infinite."""
    config = VaeConfig(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1)
    ref = reference_vae(config, seed=4)
    enc32, dec32 = loaded_from(ref, config)
    enc, dec = loaded_from(ref, config, dtype)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 5e-3
    half_zero = torch.cat([torch.zeros(1, 3, 24, 40), random_images(1, 24, 40)], 2)
    with torch.no_grad():
        cases = ((torch.zeros(1, 3, 32, 32), {}), (half_zero, {}), (random_images(1, 40, 56), {"tile_size": 8}))
        for x, kwargs in cases:
            assert rel_err(enc(x.to(dtype), **kwargs), enc32(x)) <= tolerance
        z = torch.randn(1, config.latent_channels, 1, 1)
        assert rel_err(dec(z.to(dtype)), dec32(z)) <= 2 * tolerance


def test_half_precision_group_norm_with_only_the_bias_trained_keeps_gradients():
    """Bias-only fine-tuning (frozen weight, trainable bias) records autograd through the GroupNorm in half
    precision too: PyTorch's kernel takes it, not the out= path."""
    from sdvae.fast import groupnorm

    norm = torch.nn.GroupNorm(4, 16).bfloat16()
    norm.weight.requires_grad_(False)
    groupnorm.exact_group_norm(norm, torch.randn(2, 16, 8, 8).bfloat16(), silu=True).float().sum().backward()
    assert norm.bias.grad is not None and norm.bias.grad.abs().sum() > 0


def test_a_resnet_called_on_an_nchw_map_equals_the_channels_last_result(monkeypatch):
    """The encoder keeps maps channels-last; a block called directly on an NCHW map takes the whole-map path (the
    row bands and the Winograd transforms read each band as one run of memory) with the same result."""
    from sdvae.fast import winograd
    from sdvae.fast.path import run_layer
    from sdvae.model.network import ResnetBlock

    monkeypatch.setattr(winograd, "MIN_WORK", 0)
    torch.manual_seed(0)
    block = ResnetBlock(128, 128, 32).requires_grad_(False)
    x = torch.randn(1, 128, 24, 20)  # sides multiples of 4: the transforms write straight into the output
    with torch.no_grad():
        nchw = run_layer(block, x.clone())
        cl = run_layer(block, x.contiguous(memory_format=torch.channels_last))
    assert rel_err(nchw, cl) <= 1e-5


def test_bfloat16_on_a_cpu_without_native_support_warns_once(monkeypatch):
    import warnings

    from sdvae.vae import base as module

    encoder = VaeEncoder(VaeConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8))
    encoder = encoder.to(torch.bfloat16)
    x = torch.rand(1, 3, 16, 16)
    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: False)
    module._warn_slow_bfloat16.cache_clear()
    with pytest.warns(RuntimeWarning, match="no native bfloat16"):
        encoder(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(x)  # once per process
        encoder.float()(x)  # float32 never warns
    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: True)
    module._warn_slow_bfloat16.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.to(torch.bfloat16)(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plain", [False, True])
def test_conv_into_writes_or_adds_a_band_in_every_dtype(dtype, plain, monkeypatch):
    """Half precision through oneDNN's fused sum needs AVX-512 or AVX-NE-CONVERT (it raises on an AVX2-only CPU):
    where `fused_sum` says no, `conv_into` takes the plain convolution, with the same result."""
    import sdvae.fast.bands

    if plain:  # else this CPU's own answer: the fused sum where it runs
        monkeypatch.setattr(sdvae.fast.bands, "fused_sum", lambda _: False)
    conv = torch.nn.Conv2d(16, 8, 3, padding=1).to(dtype).requires_grad_(False)
    x = torch.randn(1, 16, 7, 9).to(dtype).contiguous(memory_format=torch.channels_last)  # 5 rows + halo
    base = torch.randn(1, 8, 5, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=(0, 1))
    for add in (False, True):
        out = base.clone()
        sdvae.fast.bands.conv_into(conv, x, out, add)
        assert rel_err(out, want + (base.double() if add else 0)) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_inference_runs_resnets_and_downsamples_by_row_bands_into_their_outputs():
    """Row bands (sdvae.fast.bands) are what keep two full-size maps instead of four: no conv sees a whole map of the
    first block, and convs write into their outputs through oneDNN's fused sum."""
    import sdvae.fast.bands

    enc = VaeEncoder(SMALL).eval().requires_grad_(False)
    height, width = 96, sdvae.fast.bands.BAND_PIXELS // 16  # bands of 16 rows
    with torch.no_grad(), profile(record_shapes=True) as prof:
        enc(random_images(1, height, width))
    conv_heights = [e.input_shapes[1][2] for e in prof.events() if e.name == "mkldnn::_convolution_pointwise_"]
    assert conv_heights and 16 + 2 in conv_heights and max(conv_heights) < height  # bands with their halo rows
    plain = [e.input_shapes[0] for e in prof.events() if e.name == "aten::convolution"]
    assert all(shape[1] == 3 or shape[2] <= height // 4 for shape in plain), plain  # conv_in; conv_out, quant_conv


def winograd_kernels(enc: VaeEncoder, x: torch.Tensor) -> tuple[torch.Tensor, list, list]:
    """`enc(x)`, the shapes of the transformed kernels its GEMMs read ([36, C_in, C_out]), and the weights of the
    stride-1 3x3 convs that ran directly (oneDNN's fused-sum conv takes (out, x, weight, ...): a band of a stride-1
    conv reads 2 halo rows more than it writes; the Downsample conv, stride 2, reads twice as many)."""
    with torch.no_grad(), profile(record_shapes=True) as prof:
        got = enc(x)
    direct = [(e.input_shapes[2], e.input_shapes[1][2] - e.input_shapes[0][2]) for e in prof.events()
              if e.name == "mkldnn::_convolution_pointwise_"]
    kernels = [e.input_shapes[1] for e in prof.events()  # not the transforms' GEMMs, by [h, 6 or 4, 6] matrices
               if e.name == "aten::bmm" and e.input_shapes[0][2] != 6]
    return got, kernels, [weight for weight, halo in direct if weight[2:] == [3, 3] and halo == 2]


def test_float32_resnets_of_128_channels_and_more_run_winograd_by_default():
    """The 3x3 convs of float32 resnets 128 channels wide and more, on maps large enough, go through Winograd's
    F(4x4, 3x3) (sdvae.fast.winograd): 36 GEMMs in one batched call instead of oneDNN's direct convolution, and the
    result stays within float32 parity of the float64 one. Small maps keep the direct conv."""
    config = VaeConfig(block_out_channels=(128, 256), layers_per_block=1, norm_num_groups=32)
    ref = reference_vae(config, seed=6)
    enc = VaeEncoder(config)
    load_weights(enc, ref.state_dict())
    x = random_images(1, 128, 264)  # the 256-channel level: 64 x 132 pixels, enough at 128 x 256 channels
    got, kernels, direct = winograd_kernels(enc, x)
    assert [36, 128, 128] in kernels and [36, 128, 256] in kernels and [36, 256, 256] in kernels, kernels
    assert not direct, direct
    with torch.no_grad():
        assert rel_err(got, ref.double().encode(x.double()).latent_dist.parameters) <= 1e-5
    _, kernels, direct = winograd_kernels(enc, random_images(1, 24, 40))
    assert not kernels and len(direct) == 8, (kernels, direct)  # the down blocks' 2 resnets, the mid block's 2


def test_compiled_encoder_and_decoder_match_diffusers(tmp_path):
    """`compile=True` runs the whole-map network through torch.compile (inductor) and stays within float32 parity."""
    import torch._dynamo

    vae = reference_vae(SMALL, seed=5)
    vae.save_pretrained(tmp_path)
    x = random_images(1, 40, 24)
    torch._dynamo.reset()
    enc, dec = load_encoder(tmp_path, compile=True), load_decoder(tmp_path, compile=True)
    with torch.no_grad():
        mean = enc.encode(x).mean
        images = dec.decode(mean)
        want_mean = vae.encode(x).latent_dist.mean
        want_images = vae.decode(want_mean).sample
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # each network one whole graph: no breaks
    assert rel_err(mean, want_mean) <= 1e-5
    assert rel_err(images, want_images) <= 1e-5


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_the_fast_path_equals_the_plain_network(dtype, tolerance):
    """`fast_path(False)` runs the plain network (diffusers' ops: nn.GroupNorm, out-of-place SiLU and adds, no row
    bands); the default fast path gives the same result, encoder and decoder, untiled and tiled."""
    from sdvae import fast_path

    ref = reference_vae(SMALL, seed=8, dtype=dtype)
    enc, dec = loaded_from(ref, SMALL, dtype)
    x = random_images(2, 36, 44, dtype=dtype)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(3), dtype=dtype)
    with torch.no_grad():
        with fast_path(False), profile() as prof:
            plain, plain_images = enc(x), dec(z)
        ops = {e.name for e in prof.events()}
        assert "aten::group_norm" in ops and not {"aten::silu_", "mkldnn::_convolution_pointwise_"} & ops
        assert rel_err(plain, ref.encode(x).latent_dist.parameters) <= tolerance
        assert rel_err(enc(x), plain) <= tolerance and rel_err(dec(z), plain_images) <= tolerance
        assert rel_err(enc(x, tile_size=16), plain) <= tolerance
    from sdvae.fast.path import enabled

    assert enabled()  # the switch is back on after its block
