"""The command line: the README's demo runs end to end, and `info` describes a checkpoint."""

from __future__ import annotations

import torch
from reference import diffusers_to_ldm, reference_vae, unet_and_text_tensors
from safetensors.torch import save_file

from sdvae import VaeConfig
from sdvae.checkpoint.keys import map_keys, to_ldm
from sdvae.cli import main


def test_demo_runs_and_writes_its_files(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM-weight" in out and out.count("checks ok") == 3
    assert "latents [1, 4, 12, 20]" in out
    assert (tmp_path / "checker.decoded.png").exists()


def test_ldm_export_agrees_with_the_independent_writer():
    state = reference_vae(VaeConfig.preset("sd15")).state_dict()
    ours, theirs = to_ldm(state, 4), diffusers_to_ldm(state, 4)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert set(map_keys(ours).names) == set(state)


def test_info_names_layout_parts_dtype_and_family(tmp_path, capsys):
    ldm = diffusers_to_ldm(reference_vae(VaeConfig.preset("sdxl")).half().state_dict(), 4)
    path = tmp_path / "sd_xl_base.safetensors"
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()} | unet_and_text_tensors("sdxl"), path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ldm under 'first_stage_model.'" in out
    assert "encoder, decoder" in out and "F16" in out
    assert "inferred (sdxl)" in out and "scaling_factor: 0.13025" in out


def test_info_on_a_broken_file_exits_2_with_the_file_named(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 12)
    assert main(["info", str(path)]) == 2
    assert "broken.safetensors" in capsys.readouterr().err
