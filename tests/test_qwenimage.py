"""The Qwen-Image VAE (= Wan 2.1's; diffusers `AutoencoderKLQwenImage`) as a 2-D network for one frame: parity with
diffusers on `[B, 3, 1, H, W]`, the pipelines' latent normalization, every checkpoint layout, and `sdvae encode`."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img import QwenImageImg2ImgPipeline
from PIL import Image
from reference import loaded_from, random_images, reference_vae, rel_err
from safetensors.torch import save_file
from test_flux2 import bfl_file, flux2_reference

import sdvae
from sdvae import LatentDataset, VaeConfig
from sdvae.cli import main
from sdvae.data.prepare import prepare

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
# Qwen-Image's depth and layout (4 levels, 2 residual blocks each: the original file's indices), narrow widths.
KWARGS = dict(base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2)


CONFIG = VaeConfig.from_diffusers({**KWARGS, "_class_name": "AutoencoderKLQwenImage"})


def qwen_reference(dtype: torch.dtype = torch.float32) -> AutoencoderKLQwenImage:
    """diffusers' Qwen-Image VAE with fresh random weights, its RMS norms' gammas and the biases perturbed."""
    return reference_vae(CONFIG, dtype=dtype)


@pytest.fixture(scope="module")
def refs():
    return {dtype: qwen_reference(dtype) for dtype in (torch.float32, torch.float64)}


@pytest.fixture(scope="module")
def ours(refs):
    return {dtype: loaded_from(ref, CONFIG, dtype) for dtype, ref in refs.items()}


def test_the_temporal_convs_are_reported_unused_not_foreign(ours):
    for module in ours[torch.float32]:
        assert any(".time_conv." in k for k in module.load_report.dropped) and not module.load_report.foreign


def test_the_config_is_read_from_diffusers():
    config = VaeConfig.from_diffusers({**qwen_reference().config, "_class_name": "AutoencoderKLQwenImage"})
    assert config.family == "qwenimage" and config.network == "wan" and config.latent_channels == 16
    assert config.block_out_channels == (16, 32, 64, 64) and config.layers_per_block == 2
    assert VaeConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(ValueError, match="is_residual=True: not the Wan 2.1 / Qwen-Image VAE"):
        VaeConfig.from_diffusers({"_class_name": "AutoencoderKLWan", "is_residual": True, "z_dim": 48})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encoder_and_decoder_equal_diffusers_on_one_frame(refs, ours, dtype):
    ref, (enc, dec) = refs[dtype], ours[dtype]
    x = random_images(2, 40, 24, dtype=dtype)
    z = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        want = ref.encode(x[:, :, None]).latent_dist
        got = enc.encode(x)
        assert got.mean.shape == (2, 16, 5, 3)
        for a, b in ((enc(x), want.parameters[:, :, 0]), (got.mean, want.mean[:, :, 0]),
                     (got.logvar, want.logvar[:, :, 0])):
            assert rel_err(a, b) <= TOLERANCE[dtype]
        image = ref.decode(z[:, :, None]).sample
        assert rel_err(dec(z), image[:, :, 0]) <= TOLERANCE[dtype]
        # diffusers' own form in and out: [B, C, 1, H, W]
        assert rel_err(enc(x[:, :, None]), want.parameters) <= TOLERANCE[dtype]
        framed = enc.encode(x[:, :, None])
        assert framed.mean.shape == want.mean.shape and rel_err(framed.mean, want.mean) <= TOLERANCE[dtype]
        assert framed.sample(seed=3).shape == want.mean.shape
        assert rel_err(dec(z[:, :, None]), image) <= TOLERANCE[dtype]


def test_the_decoder_clamps_to_minus_one_one_as_diffusers_does(refs, ours):
    ref, (_, dec) = refs[torch.float64], ours[torch.float64]
    z = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ref.decoder.conv_out.bias.add_(0.8)
        dec.decoder.conv_out.bias.add_(0.8)
        try:
            want, got = ref.decode(z[:, :, None]).sample[:, :, 0], dec(z)
        finally:
            ref.decoder.conv_out.bias.sub_(0.8)
            dec.decoder.conv_out.bias.sub_(0.8)
    assert (want == 1).any() and torch.equal(got == 1, want == 1) and rel_err(got, want) <= 1e-12


def test_more_than_one_frame_is_refused(ours):
    enc, dec = ours[torch.float32]
    with pytest.raises(ValueError, match=r"one frame \[B, C, 1, H, W\], got \[1, 3, 5, 16, 16\] \(5 frames\)"):
        enc(torch.zeros(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"got \[1, 16, 2, 2, 2\] \(2 frames\)"):
        dec(torch.zeros(1, 16, 2, 2, 2))


def pipeline(ref: AutoencoderKLQwenImage) -> SimpleNamespace:
    return SimpleNamespace(vae=ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_latents_are_the_pipelines_own(refs, ours, dtype):
    """`encode_with_scaling(generator=g)` = `QwenImageImg2ImgPipeline._encode_vae_image` (a sample, normalized per
    channel); `decode_with_scaling` = the end of the pipeline's `__call__` (the inverse, then the decoder)."""
    ref, (enc, dec) = refs[dtype], ours[dtype]
    x = random_images(2, 32, 48, dtype=dtype)
    with torch.no_grad():
        want = QwenImageImg2ImgPipeline._encode_vae_image(pipeline(ref), x[:, :, None],
                                                           generator=torch.Generator().manual_seed(5))
        got = enc.encode_with_scaling(x[:, :, None], generator=torch.Generator().manual_seed(5))
        assert got.shape == want.shape == (2, 16, 1, 4, 6)
        assert rel_err(got, want) <= TOLERANCE[dtype]
        mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1).to(dtype)
        inverse_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1).to(dtype)
        image = ref.decode(want / inverse_std + mean).sample
        assert rel_err(dec.decode_with_scaling(want), image) <= TOLERANCE[dtype]
        assert rel_err(dec.decode_with_scaling(want[:, :, 0]), image[:, :, 0]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fast_path_equals_the_plain_network(refs, ours, dtype, monkeypatch):
    """Residual blocks and downsamples by row bands (several per map here), the wide convs as Winograd's F(4x4, 3x3)
    (thresholds lowered to reach these widths): equal to the plain network, which equals diffusers."""
    from torch.profiler import profile

    import sdvae.fast.bands
    import sdvae.fast.winograd

    monkeypatch.setattr(sdvae.fast.bands, "BAND_PIXELS", 64)
    monkeypatch.setattr(sdvae.fast.winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(sdvae.fast.winograd, "MIN_WORK", 0)
    enc, dec = ours[dtype]
    x = random_images(2, 48, 40, dtype=dtype)
    z = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        with sdvae.fast_path(False):
            plain, plain_images = enc(x), dec(z)
        with profile() as prof:
            fast, fast_images = enc(x), dec(z)
    ops = {e.name for e in prof.events()}
    assert "mkldnn::_convolution_pointwise_" in ops or dtype != torch.float32  # (the bands' fused conv and add)
    assert rel_err(plain, refs[dtype].encode(x[:, :, None]).latent_dist.parameters[:, :, 0]) <= TOLERANCE[dtype]
    assert rel_err(fast, plain) <= TOLERANCE[dtype] and rel_err(fast_images, plain_images) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["memory", "files", "recompute"])
def test_exact_tiles_equal_the_untiled_encoder(ours, dtype, where, tmp_path, monkeypatch):
    """The RMS norms are per pixel, so tiles need no statistics; the attention runs by blocks with an online softmax.
    Every stage's activations in memory, in scratch files, or recomputed: the untiled result."""
    from sdvae.tiled.tiling import TilePlan, tiled_params

    monkeypatch.setenv("SDVAE_SCRATCH", str(tmp_path))
    enc, _ = ours[dtype]
    x = random_images(2, 72, 40, dtype=dtype).contiguous(memory_format=torch.channels_last)
    plan = TilePlan(16, (where,) * (len(enc.config.block_out_channels) + 1))
    with torch.no_grad():
        want = enc(x)
        got = tiled_params(enc.encoder, enc.quant_conv, x, plan)
        assert rel_err(got, want) <= TOLERANCE[dtype]
        assert rel_err(enc(x, tile_size=24), want) <= TOLERANCE[dtype]


def test_a_memory_budget_tiles_it_with_a_log_line(ours, caplog, tmp_path, monkeypatch):
    from sdvae.tiled.budget import untiled_peak

    monkeypatch.setenv("SDVAE_SCRATCH", str(tmp_path))
    enc, _ = ours[torch.float64]
    x = random_images(1, 192, 192, dtype=torch.float64)
    budget = untiled_peak(enc.config, tuple(x.shape), x.dtype) - (2 << 20)  # (tiles with scratch files fit)
    with torch.no_grad(), caplog.at_level("INFO", logger="sdvae"):
        got = enc(x, max_memory=budget)
        assert "exact tiles of" in caplog.text
        assert rel_err(got, enc(x)) <= 1e-12


# --- checkpoints ---

_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}


def wan_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan 2.1's original names (`Wan2.1_VAE.pth`; ComfyUI's `qwen_image_vae.safetensors`), written from the names
    SPEC.md lists and checked below against diffusers' own converter."""
    out = {}
    for key, value in state.items():
        k = key
        if re.search(r"\.(down_blocks|resnets)\.\d+\.", k):  # a residual block's own names
            k = re.sub(r"\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(gamma|weight|bias)$",
                       lambda m: f".{_RESIDUAL[m[1]]}.{m[2]}", k)
        k = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
             "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}.get(k, k)
        k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", k)
        k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", k)
        k = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".middle.{2 * int(m[1])}.", k)
        k = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.",
                   lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.",
                   lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.", k)
        out[k] = value
    return out


def test_the_wan_writer_agrees_with_diffusers_converter(refs):
    state = refs[torch.float32].state_dict()
    original = wan_file(state)
    assert "decoder.upsamples.4.shortcut.weight" in original and "encoder.head.0.gamma" in original
    converted = convert_wan_vae_to_diffusers(dict(original))
    assert converted.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


def write_layouts(ref: AutoencoderKLQwenImage, folder) -> dict[str, object]:
    state = ref.state_dict()
    paths = {}
    ref.save_pretrained(folder / "qwen-vae")
    paths["diffusers"] = folder / "qwen-vae"
    ref.save_pretrained(folder / "Qwen-Image" / "vae")
    (folder / "Qwen-Image" / "model_index.json").write_text("{}")
    paths["pipeline"] = folder / "Qwen-Image"
    wan = AutoencoderKLWan(**KWARGS)  # Wan 2.1's diffusers class: the same network and names
    wan.load_state_dict(state)
    wan.save_pretrained(folder / "wan-vae")
    paths["wan diffusers"] = folder / "wan-vae"
    torch.save(wan_file(state), folder / "Wan2.1_VAE.pth")
    paths["Wan2.1_VAE.pth"] = folder / "Wan2.1_VAE.pth"
    for name, tensors in {
        "qwen_image_vae.safetensors": {k: v.to(torch.bfloat16) for k, v in wan_file(state).items()},
        "qwen_image_vae_fp16.safetensors": {k: v.half() for k, v in wan_file(state).items()},
        "qwen-vae-prefixed.safetensors": {f"vae.{k}": v for k, v in state.items()},
    }.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name)
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def layouts(refs, tmp_path_factory):
    return write_layouts(refs[torch.float32], tmp_path_factory.mktemp("qwen"))


@pytest.mark.parametrize("layout", ["diffusers", "pipeline", "wan diffusers", "Wan2.1_VAE.pth",
                                    "qwen_image_vae.safetensors", "qwen_image_vae_fp16.safetensors",
                                    "qwen-vae-prefixed.safetensors"])
def test_every_layout_loads_as_qwenimage_and_equals_diffusers(refs, layouts, layout):
    ref = refs[torch.float32]
    enc = sdvae.load_encoder(layouts[layout], strict=True)
    dec = sdvae.load_decoder(layouts[layout], strict=True)
    assert enc.config.family == dec.config.family == "qwenimage"
    assert enc.load_report.layout == ("wan" if layout.startswith(("Wan2.1", "qwen_image")) else "diffusers")
    assert any(".time_conv." in k for k in enc.load_report.dropped)
    tolerance = {"qwen_image_vae.safetensors": 5e-2, "qwen_image_vae_fp16.safetensors": 1e-2}.get(layout, 1e-5)
    x = random_images(1, 32, 32)
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(enc(x), ref.encode(x[:, :, None]).latent_dist.parameters[:, :, 0]) <= tolerance
        assert rel_err(dec(z), ref.decode(z[:, :, None]).sample[:, :, 0]) <= tolerance


def test_a_missing_tensor_is_named_as_the_original_file_names_it(refs, tmp_path):
    original = wan_file(refs[torch.float32].state_dict())
    for key in ("decoder.upsamples.7.resample.1.weight", "encoder.middle.2.residual.3.gamma", "conv2.bias"):
        broken = {k: v.contiguous() for k, v in original.items() if k != key}
        save_file(broken, tmp_path / "broken.safetensors")
        with pytest.raises(ValueError, match=rf"missing .*: {re.escape(key)}$"):
            sdvae.load_decoder(tmp_path / "broken.safetensors") if key.startswith(("decoder", "conv2")) \
                else sdvae.load_encoder(tmp_path / "broken.safetensors")


def test_info_names_the_family_and_layout(layouts, capsys):
    assert main(["info", str(layouts["Wan2.1_VAE.pth"])]) == 0
    said = capsys.readouterr().out
    assert "qwenimage" in said and "wan" in said and "[32, H/8, W/8] raw" in said


def test_an_sd_file_given_family_qwenimage_is_refused(tmp_path, model):
    with pytest.raises(ValueError, match="not a qwenimage VAE: its weights have network 'autoencoder_kl'"):
        sdvae.load_encoder(model, family="qwenimage")


def test_a_wan_file_given_another_family_is_refused_naming_the_family_it_fits(layouts):
    for family in ("sd15", "flux2"):
        with pytest.raises(ValueError, match=rf"not a {family} VAE: its weights have network 'wan'.*; they fit "
                                             r"qwenimage$"):
            sdvae.load_encoder(layouts["Wan2.1_VAE.pth"], family=family)


# --- through sdvae encode ---

def test_sdvae_encode_stores_latents_normalized_as_the_pipeline_does(refs, layouts, tmp_path, capsys):
    ref = refs[torch.float32]
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    out = tmp_path / "out"
    assert main(["encode", str(images), "--model", str(layouts["Wan2.1_VAE.pth"]), "--output", str(out),
                 "--resolution", "32", "--workers", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == "qwenimage" and manifest["config"]["_class_name"] == "AutoencoderKLQwenImage"
    latents_mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    for item in LatentDataset(out, mode=True):
        assert item["latent"].shape == (16, 4, 4)
        pixels = prepare(Image.open(item["source"]).convert("RGB"), (32, 32)).pixels  # (the centre crop)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0
        with torch.no_grad():  # the edit pipelines' form: the mode, normalized as `_encode_vae_image` does
            want = (ref.encode(x).latent_dist.mode() - latents_mean) * inverse_std
        assert rel_err(item["latent"], want[0, :, 0]) <= 1e-5
    assert main(["decode", str(out), "--out", str(tmp_path / "preview.png")]) == 0
    flux2 = tmp_path / "ae.safetensors"  # another family's decoder: refused, naming both families
    save_file({k: v.contiguous() for k, v in bfl_file(flux2_reference().state_dict()).items()}, flux2)
    assert main(["decode", str(out), "--model", str(flux2), "--out", str(tmp_path / "x.png")]) == 2
    assert "a flux2 VAE, but" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    tiled = tmp_path / "tiled"
    assert main(["encode", str(images), "--model", str(layouts["Wan2.1_VAE.pth"]), "--output", str(tiled),
                 "--resolution", "32", "--workers", "0", "--tile-size", "16"]) == 0
    for a, b in zip(LatentDataset(out, mode=True), LatentDataset(tiled, mode=True)):
        assert a["key"] == b["key"] and rel_err(b["mean"], a["mean"]) <= 1e-5
