"""Start-up costs: `import sdvae` on top of `import torch`, and loading the encoder from a whole single-file
checkpoint (VAE under first_stage_model. beside ~1.6 GB of other tensors) against diffusers' from_single_file.
Usage: HF_HUB_OFFLINE=1 python bench/load.py   (file in the page cache: best of 3)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import sdvae
from sdvae import VaeConfig, VaeDecoder, VaeEncoder
from sdvae.checkpoint.keys import to_ldm


def best(run, n: int = 3) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def import_seconds(code: str) -> float:
    return best(lambda: subprocess.run([sys.executable, "-c", code], check=True), 5)


def main() -> None:
    from diffusers import AutoencoderKL

    tmp = Path(tempfile.mkdtemp(prefix="sdvae-bench-"))
    config = VaeConfig.preset("sd15")
    vae = {**VaeEncoder(config).state_dict(), **VaeDecoder(config).state_dict()}
    tensors = {f"first_stage_model.{k}": v.contiguous() for k, v in to_ldm(vae, 4).items()}
    tensors |= {f"model.diffusion_model.blocks.{i}.weight": torch.randn(10_000_000) for i in range(40)}
    tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(49408, 768)
    path = tmp / "v1-5-style.safetensors"
    save_file(tensors, path)
    del tensors
    folder = tmp / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_diffusers()))
    torch_s = import_seconds("import torch")
    ours_import = import_seconds("import torch, sdvae")
    ours = best(lambda: sdvae.load_encoder(path))
    theirs = best(lambda: AutoencoderKL.from_single_file(str(path), config=str(folder), local_files_only=True))
    print("| what | seconds |\n|---|---|")
    print(f"| import torch | {torch_s:.2f} |\n| import torch, sdvae | {ours_import:.2f} |")
    print(f"| sdvae.load_encoder, {path.stat().st_size / 1e9:.1f} GB single file | {ours:.2f} |")
    print(f"| diffusers AutoencoderKL.from_single_file, same file | {theirs:.2f} |")
    print(f"diffusers / sdvae load time: {theirs / ours:.1f}x; import sdvae adds {ours_import - torch_s:.2f} s")


if __name__ == "__main__":
    main()
