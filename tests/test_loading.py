"""Every checkpoint layout users have on disk, written by the tests with random weights, loaded and compared."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from reference import (
    diffusers_to_deprecated_attention,
    diffusers_to_ldm,
    random_images,
    reference_vae,
    rel_err,
    unet_and_text_tensors,
)
from safetensors.torch import save_file

import sdvae
from sdvae import VaeConfig, load_weights
from sdvae.checkpoint.loading import SafetensorsFile

# A small config for the layout tests: three blocks so the LDM up-block reversal is exercised.
SMALL = VaeConfig(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64)


@pytest.fixture(scope="module")
def small_ref():
    return reference_vae(SMALL, seed=3)


@pytest.fixture(scope="module")
def small_state(small_ref):
    return {k: v.contiguous() for k, v in small_ref.state_dict().items()}


def assert_matches(ref, source, **kwargs):
    """The encoder and decoder loaded from `source` equal the diffusers reference in float32."""
    enc = sdvae.load_encoder(source, **kwargs)
    dec = sdvae.load_decoder(source, **kwargs)
    x = random_images(2, 20, 28)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        assert rel_err(enc(x), want.parameters) <= 1e-5
        assert rel_err(dec.decode(want.mean), ref.decode(want.mean).sample) <= 1e-5
    return enc, dec


def test_diffusers_folder(small_ref, tmp_path):
    small_ref.save_pretrained(tmp_path)
    enc, _ = assert_matches(small_ref, tmp_path)
    assert enc.config == SMALL
    assert enc.load_report.layout == "diffusers"
    assert {k.split(".")[0] for k in enc.load_report.dropped} == {"decoder", "post_quant_conv"}
    assert not enc.load_report.foreign


def test_diffusers_folder_bin(small_ref, tmp_path):
    small_ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    assert_matches(small_ref, tmp_path)


def test_fp16_variant_loads_in_the_dtype_asked_for(small_ref, tmp_path):
    half = copy.deepcopy(small_ref).half()
    half.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert_matches(half.float(), tmp_path, dtype=torch.float32)
    enc = sdvae.load_encoder(tmp_path, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16


def test_pipeline_folder(small_ref, tmp_path):
    small_ref.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet").mkdir()
    assert_matches(small_ref, tmp_path)


def test_vae_prefixed_single_file(small_ref, small_state, tmp_path):
    path = tmp_path / "pipeline.safetensors"
    save_file({f"vae.{k}": v for k, v in small_state.items()} | {"unet.conv_in.weight": torch.ones(2)}, path)
    enc, _ = assert_matches(small_ref, path, config=SMALL)
    assert enc.load_report.prefix == "vae."
    assert enc.load_report.foreign == ("unet.conv_in.weight",)


def test_deprecated_attention_names(small_ref, small_state, tmp_path):
    path = tmp_path / "old.safetensors"
    save_file(diffusers_to_deprecated_attention(small_state), path)
    enc, _ = assert_matches(small_ref, path, config=SMALL)
    assert "deprecated-attention" in enc.load_report.layout


def test_ldm_writer_agrees_with_diffusers_converter(small_ref, small_state):
    ldm = diffusers_to_ldm(small_state, len(SMALL.block_out_channels))
    converted = convert_ldm_vae_checkpoint(ldm, dict(small_ref.config))
    assert converted.keys() == small_state.keys()
    for key, value in small_state.items():
        assert torch.equal(converted[key].reshape(value.shape), value), key


def test_ldm_standalone_file(small_ref, small_state, tmp_path):
    path = tmp_path / "vae-ft-mse.safetensors"
    save_file(diffusers_to_ldm(small_state, 3), path)
    enc, _ = assert_matches(small_ref, path, config=SMALL)
    assert enc.load_report.layout == "ldm"


def test_ldm_ckpt_pickle_with_state_dict_wrapper(small_ref, small_state, tmp_path):
    path = tmp_path / "model.ckpt"
    ldm = {f"first_stage_model.{k}": v for k, v in diffusers_to_ldm(small_state, 3).items()}
    torch.save({"state_dict": ldm, "global_step": 5}, path)
    assert_matches(small_ref, path, config=SMALL)


@pytest.fixture(scope="module")
def full_refs():
    return {4: reference_vae(VaeConfig.preset("sd15"), seed=5), 16: reference_vae(VaeConfig.preset("sd3"), seed=6)}


@pytest.mark.parametrize("family,latent", [("sd15", 4), ("sd2", 4), ("sdxl", 4), ("sd3", 16), ("flux", 16)])
def test_whole_checkpoint_gives_the_family_and_reads_only_the_encoder(full_refs, family, latent, tmp_path,
                                                                      monkeypatch):
    ref = full_refs[latent]
    vae = diffusers_to_ldm(ref.state_dict(), 4)
    tensors = {f"first_stage_model.{k}": v.contiguous() for k, v in vae.items()} | unet_and_text_tensors(family)
    path = tmp_path / f"{family}.safetensors"
    save_file(tensors, path)
    read = []
    original = SafetensorsFile.__getitem__
    monkeypatch.setattr(SafetensorsFile, "__getitem__", lambda self, k: read.append(k) or original(self, k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = sdvae.load_encoder(path)
    preset = VaeConfig.preset(family)
    assert (enc.config.scaling_factor, enc.config.shift_factor) == (preset.scaling_factor, preset.shift_factor)
    assert read and all(k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv.")) for k in read)
    x = random_images(1, 24, 16)
    with torch.no_grad():
        assert rel_err(enc(x), ref.encode(x).latent_dist.parameters) <= 1e-5


def test_bare_vae_file_of_ambiguous_family_warns_and_names_family(full_refs, tmp_path):
    path = tmp_path / "sdxl_vae.safetensors"
    save_file({k: v.contiguous() for k, v in full_refs[4].state_dict().items()}, path)
    with pytest.warns(UserWarning, match="family="):
        enc = sdvae.load_encoder(path)
    assert enc.config.scaling_factor == 0.18215
    assert sdvae.load_encoder(path, family="sdxl").config.scaling_factor == 0.13025


def test_strict_names_foreign_and_missing_keys(small_state, tmp_path):
    extra = dict(small_state, **{"encoder.extra.weight": torch.ones(1), "loss.logvar": torch.ones(1)})
    enc = sdvae.VaeEncoder(SMALL)
    report = load_weights(enc, extra)
    assert set(report.foreign) == {"encoder.extra.weight", "loss.logvar"}
    with pytest.raises(ValueError, match=r"not part of the VAE: .*encoder\.extra\.weight.*loss\.logvar"):
        load_weights(sdvae.VaeEncoder(SMALL), extra, strict=True)
    load_weights(sdvae.VaeEncoder(SMALL), small_state, strict=True)  # the decoder's keys are no surprise
    missing = {k: v for k, v in small_state.items() if k not in ("encoder.conv_in.bias", "quant_conv.weight")}
    for strict in (False, True):
        with pytest.raises(ValueError, match=r"2 tensor\(s\) missing.*encoder\.conv_in\.bias.*quant_conv\.weight"):
            load_weights(sdvae.VaeEncoder(SMALL), missing, strict=strict)
    decoder_missing = {k: v for k, v in small_state.items() if k != "decoder.conv_out.weight"}
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.weight"):
        load_weights(sdvae.VaeDecoder(SMALL), decoder_missing)


def test_whole_checkpoint_is_refused_in_strict_mode(small_state, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in small_state.items()} | unet_and_text_tensors("sd15"), path)
    with pytest.raises(ValueError, match="model.diffusion_model.input_blocks.0.0.weight"):
        sdvae.load_encoder(path, config=SMALL, strict=True)


def test_sd3_weights_into_sd15_config_name_key_and_shapes(tmp_path):
    sd3 = {k: v.contiguous() for k, v in reference_vae(VaeConfig.preset("sd3")).encoder.conv_out.state_dict().items()}
    state = {f"encoder.conv_out.{k}": v for k, v in sd3.items()}
    with pytest.raises(ValueError, match=r"encoder\.conv_out\.weight: expected \[8, 512, 3, 3\], found \[32, 512, 3, 3\]"):
        load_weights(sdvae.VaeEncoder(VaeConfig.preset("sd15")), state)


@pytest.mark.parametrize("cut", [0, 7, 100, -10])
def test_truncated_files_name_the_file(small_state, tmp_path, cut):
    good = tmp_path / "good.safetensors"
    save_file(small_state, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(ValueError, match=r"bad\.safetensors.*(truncated|corrupt)"):
        sdvae.load_encoder(bad, config=SMALL)
    ckpt = tmp_path / "bad.ckpt"
    torch.save(small_state, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: max(cut, 0) or len(data) // 2])
    with pytest.raises(ValueError, match=r"bad\.ckpt"):
        sdvae.load_encoder(ckpt, config=SMALL)


class NotATensor:
    pass


class RunsACommand:
    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("payload,name", [(NotATensor(), "test_loading.NotATensor"), (RunsACommand(), "posix.system")])
def test_pickle_that_needs_more_than_weights_is_refused_on_purpose(tmp_path, payload, name):
    """Refused for safety, naming the file and what it would call: never "corrupt", never a hint to unpickle it
    unsafely (torch's own message suggests weights_only=False)."""
    path = tmp_path / "evil.bin"
    torch.save({"encoder.conv_in.weight": torch.ones(1), "payload": payload}, path)
    with pytest.raises(ValueError, match=rf"evil\.bin: refused on purpose, for safety: unpickling it would call "
                                         rf"{re.escape(name)}.*Convert the checkpoint to \.safetensors") as refused:
        sdvae.load_encoder(path, config=SMALL)
    assert "weights_only" not in str(refused.value) and "corrupt" not in str(refused.value)


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", bytes(range(256)) * 4,
                                     b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 334643244\n"])
def test_a_pickle_suffix_on_something_else_is_named_as_unreadable(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.ckpt: cannot read this checkpoint \(not a PyTorch checkpoint") as e:
        sdvae.load_encoder(path, config=SMALL)
    assert "weights_only" not in str(e.value)


def test_a_state_dict_with_a_non_tensor_value_names_its_key(small_state, tmp_path):
    path = tmp_path / "vae.pt"
    torch.save({**small_state, "global_step": 1000}, path)
    with pytest.raises(ValueError, match=r"vae\.pt: .*'global_step' holds a int"):
        sdvae.load_encoder(path, config=SMALL)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_loaded_weights_are_copies_not_views_of_the_file(small_state, tmp_path, suffix):
    """Overwriting the checkpoint in place after loading (a `cp` over it) must not reach the loaded module: the
    file is memory-mapped while it is read."""
    path, other = tmp_path / f"vae{suffix}", tmp_path / "other" / f"vae{suffix}"  # (torch.save names by the stem)
    other.parent.mkdir()
    save = save_file if suffix == ".safetensors" else torch.save
    save(small_state, path)
    save({k: v + 1 for k, v in small_state.items()}, other)
    assert path.stat().st_size == other.stat().st_size
    x = random_images(1, 16, 16)
    for dtype in (torch.float32, torch.float16):  # the file's own dtype, and a conversion
        enc = sdvae.load_encoder(path, config=SMALL, dtype=dtype)
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        with torch.no_grad():
            want = enc(x.to(dtype))
        with open(path, "r+b") as f:
            f.write(other.read_bytes())
        changed = [k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])]
        assert not changed
        with torch.no_grad():
            assert torch.equal(enc(x.to(dtype)), want)
        save(small_state, path)


def test_non_vae_file_is_named(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file(unet_and_text_tensors("sd15"), path)
    with pytest.raises(ValueError, match=r"unet\.safetensors: no VAE tensors"):
        sdvae.load_encoder(path)


def test_a_missing_relative_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()

    def no_hub(repo_id):
        raise AssertionError(f"{repo_id} was looked up on the hub")

    monkeypatch.setattr(sdvae.checkpoint.loading, "_from_hub", no_hub)
    for path in ("./models/vae.safetensors", "../models/vae.safetensors", "models/sd/vae.safetensors",
                 "models/vae.safetensors", "-acme/vae"):
        with pytest.raises(FileNotFoundError, match=f"{path}: no such file or folder"):
            sdvae.load_encoder(path)


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sdvae.load_encoder(tmp_path / "nowhere.safetensors")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.npz: unknown checkpoint type"):
        sdvae.load_encoder(odd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no VAE weights"):
        sdvae.load_encoder(tmp_path / "empty")


def test_other_suffixes_are_read_by_their_bytes(small_ref, small_state, tmp_path):
    save_file(small_state, tmp_path / "ae.sft")  # FLUX's original file name
    assert_matches(small_ref, tmp_path / "ae.sft", config=SMALL)
    torch.save(small_state, tmp_path / "vae.model")
    assert_matches(small_ref, tmp_path / "vae.model", config=SMALL)
    torch.save(small_state, tmp_path / "legacy.weights", _use_new_zipfile_serialization=False)
    assert_matches(small_ref, tmp_path / "legacy.weights", config=SMALL)
    for junk in (b"", b"x", b"\x10\0\0\0\0\0\0\0[not json]xxxxxxxxxx"):
        (tmp_path / "junk.sft").write_bytes(junk)
        with pytest.raises(ValueError, match=r"junk\.sft: unknown checkpoint type '\.sft', and its bytes are neither"):
            sdvae.load_encoder(tmp_path / "junk.sft", config=SMALL)


def _hub_cache(root: Path, repo: str, ref_vae) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / commit / "vae"
    ref_vae.save_pretrained(snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_the_local_cache_offline(small_ref, tmp_path):
    _hub_cache(tmp_path / "hub", "acme/tiny-diffusion", small_ref)
    x = random_images(1, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, sdvae\n"
        "enc = sdvae.load_encoder('acme/tiny-diffusion')\n"
        f"torch.save(enc(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'out.pt')!r})\n"
        "try:\n    sdvae.load_encoder('acme/not-cached')\n"
        "except FileNotFoundError as e:\n    print(e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "acme/not-cached" in result.stdout and "cache" in result.stdout
    with torch.no_grad():
        assert rel_err(torch.load(tmp_path / "out.pt"), small_ref.encode(x).latent_dist.parameters) <= 1e-5


def test_encoder_only_file_gets_the_default_family_with_a_warning(full_refs, tmp_path):
    state = {k: v.contiguous() for k, v in full_refs[4].state_dict().items() if k.startswith(("encoder.", "quant_"))}
    path = tmp_path / "encoder-only.safetensors"
    save_file(state, path)
    with pytest.warns(UserWarning, match="family="):
        enc = sdvae.load_encoder(path)
    assert enc.config.family == "sd15" and enc.load_report.loaded == len(state)


def test_incomplete_vae_file_names_file_and_tensor(small_state, tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in small_state.items() if k != "encoder.conv_out.weight"}, path)
    with pytest.raises(ValueError, match=r"partial\.safetensors: incomplete VAE: encoder\.conv_out\.weight"):
        sdvae.load_encoder(path)


@pytest.mark.parametrize("config", [{"architectures": ["CLIPTextModel"], "hidden_size": 8}, [1, 2],
                                    {"_class_name": "UNet2DConditionModel"}])
def test_unrelated_config_json_beside_a_file_is_passed_over_with_a_warning_naming_it(full_refs, tmp_path, config):
    save_file({k: v.contiguous() for k, v in full_refs[4].state_dict().items()}, tmp_path / "vae.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning) as said:
        enc = sdvae.load_encoder(tmp_path / "vae.safetensors")
    assert enc.config.family == "sd15"
    passed_over = f"{tmp_path / 'config.json'}: not a diffusers AutoencoderKL config"
    assert any(str(w.message).startswith(passed_over) and "read from its weights" in str(w.message) for w in said)


@pytest.mark.parametrize("config,says", [
    ([1, 2], "a JSON list, not an object"),
    ({"_class_name": "AutoencoderKL", "block_out_channel": [32, 32, 64]}, "config key 'block_out_channel'"),
])
def test_a_diffusers_folder_whose_config_is_not_an_autoencoderkl_config_is_refused_naming_it(
        small_state, tmp_path, config, says):
    save_file(small_state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: not the diffusers "
                                         rf"AutoencoderKL config of diffusion_pytorch_model\.safetensors: "
                                         rf"{re.escape(says)}"):
        sdvae.load_encoder(tmp_path)


def test_a_diffusers_config_without_a_class_name_is_used(small_ref, small_state, tmp_path):
    """diffusers loads a config.json that names no class; its settings (the GroupNorm groups, which the weights
    cannot tell) must not be dropped for inferred ones."""
    save_file(small_state, tmp_path / "diffusion_pytorch_model.safetensors")
    config = {k: v for k, v in SMALL.to_diffusers().items() if not k.startswith("_")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    enc, _ = assert_matches(small_ref, tmp_path)
    assert enc.config.norm_num_groups == 8


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_fp16_ldm_pickles(small_ref, small_state, tmp_path, suffix):
    path = tmp_path / f"vae{suffix}"
    torch.save({k: v.half() for k, v in diffusers_to_ldm(small_state, 3).items()}, path)
    assert_matches(copy.deepcopy(small_ref).half().float(), path, config=SMALL)


def test_a_missing_quant_conv_weight_is_an_error_not_another_network(small_state, tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in small_state.items() if k != "quant_conv.weight"}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small config fits no family
        with pytest.raises(ValueError, match=r"vae\.safetensors: 1 tensor\(s\) missing.*: quant_conv\.weight"):
            sdvae.load_encoder(path)


def test_a_folder_of_another_model_class_is_named(small_state, tmp_path):
    save_file(small_state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    for source in (tmp_path, tmp_path / "diffusion_pytorch_model.safetensors"):
        with pytest.raises(ValueError, match="names the model class AutoencoderTiny, not AutoencoderKL"):
            sdvae.load_encoder(source)


def test_missing_tensors_are_named_as_the_file_names_them(small_state, tmp_path):
    ldm = {f"first_stage_model.{k}": v for k, v in diffusers_to_ldm(small_state, 3).items()}
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in ldm.items() if k != "first_stage_model.decoder.up.2.block.0.norm2.weight"}, path)
    sdvae.load_encoder(path, config=SMALL)
    with pytest.raises(ValueError, match=r"missing \(read as ldm layout under 'first_stage_model\.'\): "
                                         r"first_stage_model\.decoder\.up\.2\.block\.0\.norm2\.weight$"):
        sdvae.load_decoder(path, config=SMALL)


def test_a_decoder_from_an_encoder_only_file_says_so(small_state, tmp_path):
    path = tmp_path / "encoder.safetensors"
    save_file({k: v for k, v in small_state.items() if k.startswith(("encoder.", "quant_conv."))}, path)
    with pytest.raises(ValueError, match=r"encoder\.safetensors: holds no VAE decoder, only the encoder"):
        sdvae.load_decoder(path, config=SMALL)


def test_dtype_by_name_and_unsupported_dtypes(small_state, tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(small_state, path)
    assert sdvae.load_encoder(path, config=SMALL, dtype="bfloat16").dtype == torch.bfloat16
    assert sdvae.load_decoder(path, config=SMALL, dtype="torch.float64").dtype == torch.float64
    for dtype in ("float", "int8", torch.complex64, torch.int32):
        with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, float64"):
            sdvae.load_encoder(path, config=SMALL, dtype=dtype)
