"""FLUX.2's VAE (diffusers `AutoencoderKLFlux2`): the network, its latents as the FLUX.2 pipelines make them, every
checkpoint layout, and `sdvae encode` / `LatentDataset` / `sdvae decode` on it."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from PIL import Image
from reference import diffusers_to_ldm, loaded_from, random_images, reference_vae, rel_err
from safetensors.torch import save_file

import sdvae
from sdvae import LatentDataset, VaeConfig
from sdvae.cli import main
from sdvae.data.prepare import prepare

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
# Small widths, full structure: a decoder narrower than the encoder (as klein's), mid attention, quant convs, and
# FLUX.2's 32 groups (which no file records: they must be the family's for the weights to say it all).
KWARGS = dict(block_out_channels=[32, 64, 64, 64], decoder_block_out_channels=[32, 32, 64, 64], layers_per_block=1,
              norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


CONFIG = VaeConfig.from_diffusers({**KWARGS, "_class_name": "AutoencoderKLFlux2"})


def flux2_reference(dtype: torch.dtype = torch.float32) -> AutoencoderKLFlux2:
    """diffusers' FLUX.2 VAE with fresh random weights, perturbed norms and biases, and random bn statistics."""
    return reference_vae(CONFIG, dtype=dtype)


@pytest.fixture(scope="module")
def refs():
    return {dtype: flux2_reference(dtype) for dtype in (torch.float32, torch.float64)}


@pytest.fixture(scope="module")
def ours(refs):
    """Our encoder and decoder of each dtype, loaded strictly from diffusers' state dict."""
    return {dtype: loaded_from(ref, CONFIG, dtype) for dtype, ref in refs.items()}


def test_bn_num_batches_tracked_is_reported_unused_not_foreign(ours):
    for module in ours[torch.float32]:
        assert "bn.num_batches_tracked" in module.load_report.dropped and not module.load_report.foreign


def pipeline(ref: AutoencoderKLFlux2) -> SimpleNamespace:
    """What `Flux2Pipeline._encode_vae_image` reads of `self`: the VAE and the patchify step."""
    return SimpleNamespace(vae=ref, _patchify_latents=Flux2Pipeline._patchify_latents)


def pipeline_decode(ref: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """The end of `Flux2Pipeline.__call__`: undo the bn normalization, unpatchify, decode."""
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return ref.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean)).sample


def test_the_config_is_read_from_diffusers_with_its_decoder_widths(refs):
    config = VaeConfig.from_diffusers(dict(refs[torch.float32].config))
    assert config.family == "flux2" and config.latent_channels == 32 and config.patch_size == (2, 2)
    assert config.decoder_widths == (32, 32, 64, 64) and config.latent_multiple == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encoder_and_decoder_equal_diffusers_on_odd_sizes(refs, ours, dtype):
    ref, (enc, dec) = refs[dtype], ours[dtype]
    x = random_images(2, 40, 24, dtype=dtype)  # multiples of 8, not 16: the raw methods take them
    z = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = enc.encode(x)
        assert got.mean.shape == (2, 32, 5, 3)
        for a, b in ((enc(x), want.parameters), (got.mean, want.mean), (got.logvar, want.logvar)):
            assert rel_err(a, b) <= TOLERANCE[dtype]
        assert rel_err(dec(z), ref.decode(z).sample) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pipe", [Flux2Pipeline, Flux2KleinPipeline])
def test_scaled_latents_are_the_pipelines_own(refs, ours, dtype, pipe):
    """`encode_with_scaling(mode=True)` = `_encode_vae_image` (mean, 2x2 patches, bn statistics): [B, 128, H/16,
    W/16]; `decode_with_scaling` = the pipeline's decode of them."""
    ref, (enc, dec) = refs[dtype], ours[dtype]
    x = random_images(2, 48, 32, dtype=dtype)
    with torch.no_grad():
        want = pipe._encode_vae_image(pipeline(ref), x, generator=None)
        got = enc.encode_with_scaling(x, mode=True)
        assert got.shape == (2, 128, 3, 2)
        assert rel_err(got, want) <= TOLERANCE[dtype]
        assert torch.equal(enc.encode_with_scaling(x), got)  # the mean by default, as FLUX.2's pipelines use
        assert rel_err(dec.decode_with_scaling(want), pipeline_decode(ref, want)) <= TOLERANCE[dtype]


def test_a_seeded_sample_is_scaled_the_same_way(refs, ours):
    ref, (enc, _) = refs[torch.float64], ours[torch.float64]
    x = random_images(2, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        sample = enc.encode(x).sample(seed=4)
        want = pipe_scale(ref, Flux2Pipeline._patchify_latents(sample))
        assert rel_err(enc.encode_with_scaling(x, seed=4), want) <= 1e-12


def pipe_scale(ref: AutoencoderKLFlux2, patched: torch.Tensor) -> torch.Tensor:
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    return (patched - mean) / torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)


def test_decode_with_scaling_inverts_encode_with_scaling_exactly(ours):
    enc, dec = ours[torch.float64]
    z = torch.randn(1, 32, 4, 6, dtype=torch.float64)
    assert rel_err(dec.scaling.unscale(enc.scaling.scale(z)), z) <= 1e-15


def test_tiled_equals_untiled(ours):
    enc, _ = ours[torch.float64]
    x = random_images(1, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(enc(x, tile_size=16), enc(x)) <= 1e-12


def test_sides_that_are_not_multiples_of_16_are_refused_by_the_scaled_methods_only(ours):
    enc, dec = ours[torch.float32]
    x = random_images(1, 40, 32)
    with torch.no_grad():
        enc(x)  # raw: multiples of 8
        with pytest.raises(ValueError, match=r"images \[1, 3, 40, 32\]: .* multiples of 16 px"):
            enc.encode_with_scaling(x, mode=True)
        with pytest.raises(ValueError, match=r"latents \[1, 64, 3, 2\]: this VAE's scaled latents have 128 channels"):
            dec.decode_with_scaling(torch.zeros(1, 64, 3, 2))


# --- checkpoints ---

def bfl_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Black Forest Labs' `ae.safetensors` names (flux2 `src/flux2/autoencoder.py`): LDM names, the quant convs
    inside the encoder and decoder, and the bn buffers at the top."""
    ldm = diffusers_to_ldm({k: v for k, v in state.items() if not k.startswith("bn.")}, 4)
    moved = {re.sub(r"^(post_quant_conv|quant_conv)\.", lambda m: ("decoder." if m[1][0] == "p" else "encoder.")
                    + m[0], k): v for k, v in ldm.items()}
    return {**moved, **{k: v for k, v in state.items() if k.startswith("bn.")}}


def test_the_bfl_writer_agrees_with_diffusers_ldm_converter(refs):
    """Moved back to the top level (as diffusers' FLUX.2 converter does), the quant convs and the rest convert
    through diffusers' own LDM converter to the original state dict."""
    ref = refs[torch.float32]
    state = ref.state_dict()
    bfl = bfl_file(state)
    assert "encoder.quant_conv.weight" in bfl and "decoder.post_quant_conv.bias" in bfl and "bn.running_var" in bfl
    back = {re.sub(r"^(encoder|decoder)\.((post_)?quant_conv)", r"\2", k): v for k, v in bfl.items()
            if not k.startswith("bn.")}
    converted = convert_ldm_vae_checkpoint(back, dict(ref.config))
    want = {k: v for k, v in state.items() if not k.startswith("bn.")}
    assert converted.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(converted[key].reshape(value.shape), value), key


def write_layouts(ref: AutoencoderKLFlux2, folder) -> dict[str, object]:
    state = ref.state_dict()
    diffusers_dir = folder / "flux2-vae"
    ref.save_pretrained(diffusers_dir)
    pipeline_dir = folder / "FLUX.2-klein"
    ref.save_pretrained(pipeline_dir / "vae")
    (pipeline_dir / "model_index.json").write_text("{}")
    paths = {"diffusers": diffusers_dir, "pipeline": pipeline_dir}
    for name, tensors in {
        "ae.safetensors": bfl_file(state),
        "flux2-vae-prefixed.safetensors": {f"vae.{k}": v for k, v in state.items()},
        "ae-bf16.safetensors": {k: v.to(torch.bfloat16) for k, v in bfl_file(state).items()},
        "ae-fp16.safetensors": {k: v.half() if v.is_floating_point() else v for k, v in bfl_file(state).items()},
    }.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name)
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def layouts(refs, tmp_path_factory):
    return write_layouts(refs[torch.float32], tmp_path_factory.mktemp("flux2"))


@pytest.mark.parametrize("layout", ["diffusers", "pipeline", "ae.safetensors", "flux2-vae-prefixed.safetensors",
                                    "ae-bf16.safetensors", "ae-fp16.safetensors"])
def test_every_layout_loads_as_flux2_and_encodes_as_diffusers(refs, layouts, layout):
    ref = refs[torch.float32]
    enc = sdvae.load_encoder(layouts[layout], strict=True)
    dec = sdvae.load_decoder(layouts[layout], strict=True)
    assert enc.config.family == "flux2" and dec.config.decoder_widths == (32, 32, 64, 64)
    assert enc.load_report.layout == ("bfl" if layout.startswith("ae") else "diffusers")
    x = random_images(1, 32, 32)
    tolerance = {"ae-fp16.safetensors": 1e-2, "ae-bf16.safetensors": 5e-2}.get(layout, 1e-5)  # (rounded weights)
    with torch.no_grad():
        want = Flux2Pipeline._encode_vae_image(pipeline(ref), x, generator=None)
        assert rel_err(enc.encode_with_scaling(x, mode=True), want) <= tolerance
        assert rel_err(dec.decode_with_scaling(want), pipeline_decode(ref, want)) <= tolerance


def test_info_reports_the_family_and_layout(layouts, capsys):
    assert main(["info", str(layouts["ae.safetensors"])]) == 0
    said = capsys.readouterr().out
    assert "flux2" in said and "bfl" in said


def test_a_flux1_file_given_family_flux2_is_refused_naming_the_family(tmp_path):
    state = {k: v for k, v in flux2_reference().state_dict().items()}
    flux1 = AutoencoderKL_like_flux1(state)
    save_file(flux1, tmp_path / "flux1-ae.safetensors")
    with pytest.raises(ValueError, match=r"not a flux2 VAE: its weights have latent_channels 16, use_quant_conv "
                                         r"False, use_post_quant_conv False, where flux2 has latent_channels 32"):
        sdvae.load_encoder(tmp_path / "flux1-ae.safetensors", family="flux2")


def AutoencoderKL_like_flux1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: N802
    """FLUX.1's shapes: 16 latent channels, no quant convs, no bn (the same widths as `state`)."""
    from diffusers import AutoencoderKL

    kwargs = {k: v for k, v in KWARGS.items() if k != "decoder_block_out_channels"}
    vae = AutoencoderKL(**kwargs, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    return {k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict(), 4).items()}


def test_a_flux2_file_without_its_bn_statistics_is_refused_naming_the_key(refs, tmp_path):
    bfl = {k: v.contiguous() for k, v in bfl_file(refs[torch.float32].state_dict()).items()
           if k != "bn.running_var"}
    save_file(bfl, tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match=r"missing .*bn\.running_var"):
        sdvae.load_encoder(tmp_path / "ae.safetensors")


def test_a_missing_tensor_of_a_bfl_file_is_named_as_the_file_names_it(refs, tmp_path):
    bfl = bfl_file(refs[torch.float32].state_dict())
    for key, load in (("encoder.quant_conv.bias", sdvae.load_encoder), ("decoder.post_quant_conv.weight",
                                                                         sdvae.load_decoder),
                      ("encoder.down.1.block.0.nin_shortcut.weight", sdvae.load_encoder)):
        save_file({k: v.contiguous() for k, v in bfl.items() if k != key}, tmp_path / "ae.safetensors")
        with pytest.raises(ValueError, match=rf"missing \(read as bfl layout\): {re.escape(key)}$"):
            load(tmp_path / "ae.safetensors")


# --- through sdvae encode / LatentDataset / sdvae decode ---

def test_sdvae_encode_stores_latents_that_read_back_in_the_pipelines_shape(refs, layouts, tmp_path):
    ref = refs[torch.float32]
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([(48, 48), (64, 40)]):
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    out = tmp_path / "out"
    assert main(["encode", str(images), "--model", str(layouts["ae.safetensors"]), "--output", str(out),
                 "--resolution", "32", "--workers", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == "flux2" and manifest["latent_scaling"]["patch"] == 2
    dataset = LatentDataset(out)  # the mean by default for FLUX.2, as its training scripts use
    for item in dataset:
        assert item["latent"].shape == (128, 2, 2)
        pixels = prepare(Image.open(item["source"]).convert("RGB"), (32, 32)).pixels  # (the centre crop)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            want = Flux2Pipeline._encode_vae_image(pipeline(ref), x, generator=None)
        assert rel_err(item["latent"][None], want) <= 1e-5
    assert main(["decode", str(out), "--index", "0", "1", "--out", str(tmp_path / "preview.png")]) == 0
    assert Image.open(tmp_path / "preview.png").size == (64, 32)
    assert main(["encode", str(images), "--model", str(layouts["ae.safetensors"]), "--output", str(tmp_path / "x"),
                 "--resolution", "40", "--workers", "0"]) == 2  # not a multiple of 16
    assert not (tmp_path / "x").exists()
