"""sdvae vs diffusers on a GPU: images/s, peak memory, error and the fraction of the card's bfloat16 peak.

One process, one card, the same random SD 1.5 weights and inputs for every row. Usage:
  python bench/gpu.py [--sizes 512 1024] [--batches 1 16] [--dtypes float32 bfloat16 float16] [--compile]
  images/s: batch / median time of one encode (after warm-ups), CUDA synchronized; peak: the largest rise of
  allocated GPU memory during the encodes, model loaded; err: relative L2 error of the mean against diffusers in
  float32 (TF32 off) on the same card; TFLOP/s: the encoder's counted FLOPs (convs, matmuls, attention) per image
  times images/s; of peak: that against a bfloat16 8192^3 matmul timed on the card in the same run.
  --compile adds torch.compile rows (sdvae's `compile=True`, and diffusers' encoder): each shape compiles first.
  --device cpu runs the same table on the CPU, tiny sizes, to try the script.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import random_sd15_weights, rel_err


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run, device: torch.device, warmups: int = 2, budget: float = 1.0, most: int = 20) -> float:
    """Median seconds of `run()` after `warmups` calls, over as many calls as fit `budget` (3 to `most`)."""
    for _ in range(warmups):
        run()
    synchronize(device)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget and len(times) < most):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device) -> float:
    """TFLOP/s of a bfloat16 matmul large enough to run at the card's peak (8192^3; 1024^3 off the GPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / seconds(lambda: a @ b, device, warmups=3, budget=0.5) / 1e12


def flops_per_image(size: int) -> float:
    """FLOPs of one SD 1.5 encode at `size` px, as PyTorch's counter sees the whole-map network on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdvae import VaeConfig, VaeEncoder

    with torch.device("meta"):
        enc = VaeEncoder(VaeConfig.preset("sd15"))
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        enc.quant_conv(enc.encoder(x))
    return counter.get_total_flops()


def diffusers_vae(weights: Path, dtype: torch.dtype, device: torch.device):
    """diffusers' AutoencoderKL with the shared weights' encoder."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from sdvae import VaeConfig

    config = VaeConfig.preset("sd15").to_diffusers()
    ref = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    missing, _ = ref.load_state_dict(load_file(weights), strict=False)
    assert not [k for k in missing if k.startswith(("encoder.", "quant_conv."))], missing
    return ref.to(device, dtype).eval()


def implementations(weights: Path, dtype: torch.dtype, device: torch.device, compile: bool) -> dict:
    """name -> callable images -> mean, each loaded from the shared weights file."""
    import sdvae

    ref = diffusers_vae(weights, dtype, device)
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    if compile:
        ref_cl.encoder = torch.compile(ref_cl.encoder)
    encoders = {"sdvae": sdvae.load_encoder(weights, family="sd15", device=device, dtype=dtype)}
    if compile:
        encoders["sdvae-compiled"] = sdvae.load_encoder(weights, family="sd15", device=device, dtype=dtype,
                                                        compile=True)
    return {
        "diffusers": lambda x: ref.encode(x).latent_dist.mean,
        "diffusers-cl" + ("-compiled" if compile else ""):
            lambda x: ref_cl.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist.mean,
        **{name: (lambda x, enc=enc: enc.encode(x).mean) for name, enc in encoders.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    torch.set_grad_enabled(False)
    weights = random_sd15_weights(Path(tempfile.mkdtemp(prefix="sdvae-bench-")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak(device)
    print(f"{name}, torch {torch.__version__}, SD 1.5 encoder, random weights; bfloat16 matmul peak measured: "
          f"{peak:.3g} TFLOP/s")
    print("| size | batch | dtype | impl | images/s | ms / batch | peak GiB | speed / diffusers | TFLOP/s | of peak "
          "| err vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    flops = {size: flops_per_image(size) for size in args.sizes}
    reference = {}  # (size, batch) -> (input, float32 diffusers mean)
    exact = diffusers_vae(weights, torch.float32, device)  # the reference, built once
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        runs = implementations(weights, dtype, device, args.compile)
        for size in args.sizes:
            for batch in args.batches:
                if (size, batch) not in reference:
                    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
                    x = (x * 2 - 1).to(device)
                    reference[size, batch] = x, exact.encode(x).latent_dist.mean
                x, want = reference[size, batch]
                xd = x.to(dtype)
                base = None
                for impl, run in runs.items():
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                        start_mib = torch.cuda.memory_allocated(device)
                    t = seconds(lambda: run(xd), device)
                    rise = (torch.cuda.max_memory_allocated(device) - start_mib) / 2 ** 30 if device.type == "cuda" \
                        else float("nan")
                    err = rel_err(run(xd).float(), want)
                    base = base or t
                    tflops = flops[size] * batch / t / 1e12
                    print(f"| {size} | {batch} | {dtype_name} | {impl} | {batch / t:.2f} | {1e3 * t:.1f} | {rise:.2f} "
                          f"| {base / t:.2f} | {tflops:.3g} | {tflops / peak:.2f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
