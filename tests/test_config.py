"""`VaeConfig`: reading the config.json diffusers writes, refusing what sdvae cannot build, and the presets."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

from sdvae import VaeConfig
from sdvae.model.config import PRESETS

# Each family's AutoencoderKL arguments, written from SPEC.md's family table (the external truth).
SD_ARCH = dict(
    in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
NO_QUANT = dict(use_quant_conv=False, use_post_quant_conv=False)
DIFFUSERS_KWARGS = {
    "sd15": dict(SD_ARCH, latent_channels=4, scaling_factor=0.18215, sample_size=512),
    "sd2": dict(SD_ARCH, latent_channels=4, scaling_factor=0.18215, sample_size=768),
    "sdxl": dict(SD_ARCH, latent_channels=4, scaling_factor=0.13025, sample_size=1024),
    "sd3": dict(SD_ARCH, **NO_QUANT, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024),
    "flux": dict(SD_ARCH, **NO_QUANT, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 sample_size=1024),
    "playground": dict(SD_ARCH, latent_channels=4, scaling_factor=0.5, sample_size=1024,
                       latents_mean=[-1.6574, 1.886, -1.383, 2.5155], latents_std=[8.4927, 5.9022, 6.5498, 5.2299]),
    "cogview": dict(SD_ARCH, **NO_QUANT, block_out_channels=[128, 512, 1024, 1024], layers_per_block=3,
                    mid_block_add_attention=False, latent_channels=16, scaling_factor=1.0, shift_factor=0.0,
                    sample_size=1024),
    "flux2": dict(SD_ARCH, latent_channels=32, sample_size=1024, patch_size=[2, 2], batch_norm_eps=1e-4),  # Flux2
    "qwenimage": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2),  # QwenImage, its defaults
}


def diffusers_config_dir(tmp_path, kwargs) -> str:
    """The folder holding the config.json that diffusers itself writes for an AutoencoderKL (AutoencoderKLFlux2 where
    the arguments have a patch size, AutoencoderKLQwenImage where they have a base_dim) with these arguments."""
    with torch.device("meta"):  # the config is what is under test: skip allocating the weights
        vae = (AutoencoderKLQwenImage if "base_dim" in kwargs else AutoencoderKLFlux2 if "patch_size" in kwargs
               else AutoencoderKL)(**kwargs)
    vae.save_config(tmp_path)  # what save_pretrained writes as config.json
    return tmp_path


def saved_config(tmp_path, family="sd15") -> dict:
    return json.loads((diffusers_config_dir(tmp_path, DIFFUSERS_KWARGS[family]) / "config.json").read_text())


def test_kwargs_table_covers_every_preset():
    assert set(DIFFUSERS_KWARGS) == set(PRESETS)


# --- from_diffusers ---

@pytest.mark.parametrize("family", list(PRESETS))
def test_from_diffusers_reads_the_config_json_diffusers_writes(tmp_path, family):
    folder = diffusers_config_dir(tmp_path, DIFFUSERS_KWARGS[family])
    file = folder / "config.json"
    for source in (folder, str(folder), file, json.loads(file.read_text())):
        assert VaeConfig.from_diffusers(source) == VaeConfig.preset(family)


@pytest.mark.parametrize("family", list(PRESETS))
def test_to_diffusers_round_trips_through_diffusers(tmp_path, family):
    config = VaeConfig.preset(family)
    kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}
    assert VaeConfig.from_diffusers(diffusers_config_dir(tmp_path, kwargs)) == config
    assert VaeConfig.from_diffusers(config.to_diffusers()) == config


def test_from_diffusers_ignores_bookkeeping_keys(tmp_path):
    source = saved_config(tmp_path, "sdxl")
    source.update(_name_or_path="stabilityai/sdxl-vae", _diffusers_version="0.20.0.dev0",
                  _use_default_values=["shift_factor"], _commit_hash="abc")
    assert VaeConfig.from_diffusers(source) == VaeConfig.preset("sdxl")


def test_from_diffusers_accepts_sample_size_as_a_list(tmp_path):
    source = saved_config(tmp_path, "sdxl")
    source["sample_size"] = [1024, 1024]
    assert VaeConfig.from_diffusers(source) == VaeConfig.preset("sdxl")


@pytest.mark.parametrize("key,value,named", [
    ("act_fn", "relu", ["act_fn", "relu"]),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D",
                          "DownEncoderBlock2D"], ["down_block_types", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"], ["up_block_types", "AttnUpDecoderBlock2D"]),
    ("num_attention_heads", 8, ["num_attention_heads"]),
    ("_class_name", "UNet2DConditionModel", ["UNet2DConditionModel"]),
])
def test_from_diffusers_refuses_what_sdvae_cannot_build_naming_it(tmp_path, key, value, named):
    source = saved_config(tmp_path)
    source[key] = value
    with pytest.raises(ValueError) as info:
        VaeConfig.from_diffusers(source)
    for word in named:
        assert word in str(info.value)


@pytest.mark.parametrize("content", [b'{"act_fn": "silu", ', b"\xff\xfe\x00 not text"], ids=["truncated", "not-utf8"])
def test_from_diffusers_refuses_invalid_json_naming_the_file(tmp_path, content):
    file = tmp_path / "config.json"
    file.write_bytes(content)
    for source in (tmp_path, file):
        with pytest.raises(ValueError, match=re.escape(str(file))):
            VaeConfig.from_diffusers(source)


def test_a_preset_name_given_as_config_points_to_family(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"sdxl: cannot read a diffusers config \(for the sdxl preset, pass "
                                         r"family='sdxl'\)"):
        VaeConfig.from_diffusers("sdxl")


# --- validation ---

INVALID = [
    (dict(latent_channels=-4), ["latent_channels", "-4"]),
    (dict(block_out_channels=(128, 200)), ["block_out_channels", "200", "norm_num_groups"]),
    (dict(latents_mean=(0.0, 0.0, 0.0, 0.0)), ["latents_mean", "latents_std"]),
    (dict(scaling_factor=0), ["scaling_factor"]),
    (dict(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 3), ["latents_std"]),
]


@pytest.mark.parametrize("build", [lambda kw: VaeConfig(**kw), lambda kw: VaeConfig.from_diffusers(kw)],
                         ids=["constructor", "from_diffusers"])
@pytest.mark.parametrize("kwargs,named", INVALID, ids=[next(iter(kw)) + f"-{i}" for i, (kw, _) in enumerate(INVALID)])
def test_validation_errors_name_the_field(build, kwargs, named):
    with pytest.raises(ValueError) as info:
        build(kwargs)
    for word in named:
        assert word in str(info.value)


# --- presets ---

# SPEC.md's family table: latent channels, scaling_factor, shift_factor ("none" is None), quant_conv.
FAMILY_TABLE = {
    "sd15": (4, 0.18215, None, True),
    "sd2": (4, 0.18215, None, True),
    "sdxl": (4, 0.13025, None, True),
    "sd3": (16, 1.5305, 0.0609, False),
    "flux": (16, 0.3611, 0.1159, False),
    "playground": (4, 0.5, None, True),
    "cogview": (16, 1.0, 0.0, False),
}


@pytest.mark.parametrize("name", list(FAMILY_TABLE))
def test_preset_has_the_scaling_of_the_family_table(name):
    latent_channels, scaling_factor, shift_factor, quant_conv = FAMILY_TABLE[name]
    config = VaeConfig.preset(name)
    assert config.latent_channels == latent_channels
    assert config.scaling_factor == scaling_factor
    if name == "cogview":  # "none / 0.0": CogView3-Plus has none, CogView4 0.0
        assert config.shift_factor in (None, 0.0)
    else:
        assert config.shift_factor == shift_factor
    assert config.use_quant_conv is quant_conv
    assert config.use_post_quant_conv is quant_conv


def test_playground_preset_normalises_per_channel():
    config = VaeConfig.preset("playground")
    assert config.latents_mean == (-1.6574, 1.886, -1.383, 2.5155)
    assert config.latents_std == (8.4927, 5.9022, 6.5498, 5.2299)


@pytest.mark.parametrize("name", list(FAMILY_TABLE))
def test_preset_has_the_architecture_of_its_family(name):
    config = VaeConfig.preset(name)
    if name == "cogview":
        assert (config.block_out_channels, config.layers_per_block, config.mid_block_add_attention) \
            == ((128, 512, 1024, 1024), 3, False)
    else:
        assert (config.block_out_channels, config.layers_per_block, config.mid_block_add_attention) \
            == ((128, 256, 512, 512), 2, True)
    assert (config.norm_num_groups, config.in_channels) == (32, 3)


def test_unknown_preset_raises_listing_the_known_names():
    with pytest.raises(ValueError) as info:
        VaeConfig.preset("sd4")
    assert "sd4" in str(info.value)
    for name in FAMILY_TABLE:
        assert name in str(info.value)
