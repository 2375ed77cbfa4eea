"""`sdvae demo`: the whole path on this machine with no download: a random-weight SD 1.5 single-file checkpoint,
generated images, latents, and checks that the numbers hold together. The weights are random, so the decoded
pictures are noise: the demo shows the plumbing, not the quality."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint.keys import to_ldm
from .checkpoint.loading import load_decoder, load_encoder
from .data.images import image_to_tensor, pillow, tensor_to_image
from .model.config import VaeConfig
from .model.distribution import seeded_noise
from .vae.decoder import VaeDecoder
from .vae.encoder import VaeEncoder


def write_random_checkpoint(path: Path, seed: int = 0) -> None:
    """An SD 1.5 VAE with random weights, in the CompVis single-file layout (`first_stage_model.` prefix)."""
    torch.manual_seed(seed)
    config = VaeConfig.preset("sd15")
    state = {**VaeEncoder(config).state_dict(), **VaeDecoder(config).state_dict()}
    ldm = to_ldm(state, len(config.block_out_channels))
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()}, str(path))


def sample_images(size: tuple[int, int] = (128, 128)) -> dict[str, object]:
    """A few generated pictures: a colour gradient, rings, and a checkerboard of another aspect ratio."""
    image_cls = pillow()
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    gradient = np.stack([x, y, 1 - x], -1)
    r = np.hypot(x - 0.5, y - 0.5)
    rings = np.stack([np.sin(r * 40) * 0.5 + 0.5, np.cos(r * 25) * 0.5 + 0.5, r], -1)
    yy, xx = np.mgrid[0:96, 0:160]
    checker = np.repeat((((yy // 16) + (xx // 16)) % 2)[..., None], 3, -1).astype(float)
    to_image = lambda a: image_cls.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8), "RGB")  # noqa: E731
    return {"gradient": to_image(gradient), "rings": to_image(rings), "checker": to_image(checker)}


def run(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "random-sd15-single-file.safetensors"
    print(f"writing a RANDOM-weight SD 1.5 VAE in the single-file layout: {ckpt}")
    write_random_checkpoint(ckpt)
    encoder = load_encoder(ckpt, family="sd15")
    decoder = load_decoder(ckpt, family="sd15")
    scale = encoder.config.scaling_factor
    print(f"family sd15: scaling_factor {scale}, shift_factor {encoder.config.shift_factor}")
    for name, image in sample_images().items():
        image.save(out / f"{name}.png")
        x = image_to_tensor(image)[None]
        start = time.perf_counter()
        with torch.no_grad():
            dist = encoder.encode(x)
            z = encoder.scaling.scale(dist.sample(seed=0))
            back = decoder.decode_with_scaling(z)
        seconds = time.perf_counter() - start
        tensor_to_image(back[0]).save(out / f"{name}.decoded.png")
        noise = (z / scale - dist.mean) / dist.std
        checks = {
            "decoded shape == image shape": back.shape == x.shape,
            "noise is the seed's": torch.allclose(noise, seeded_noise([0], dist.mean.shape[1:]), atol=1e-3),
        }
        status = "ok" if all(checks.values()) else "FAILED: " + ", ".join(k for k, v in checks.items() if not v)
        print(f"{name:9s} {list(x.shape)} -> latents {list(z.shape)}  mean {z.mean():+.3f} std {z.std():.3f}  "
              f"round trip {list(back.shape)}  {seconds:.1f}s  checks {status}")
        if not all(checks.values()):
            return 1
    print(f"images and decoded previews are in {out}/ (the weights are random: the previews are noise).")
    print('with a real checkpoint: sdvae.load_encoder("v1-5-pruned-emaonly.safetensors").encode_with_scaling(x)')
    return 0
