"""sdvae vs diffusers: encoder time, peak memory and error, beside the conv floor. Prints one markdown table.

Every measurement runs in a fresh process (clean peak-memory readings) on the same random SD 1.5 weights and
input. Usage: python bench/encode.py [--sizes 256 512 1024] [--threads 2] [--compile] [--bfloat16] [--families]
  --families adds a second table: FLUX.2's and Qwen-Image's encoders against diffusers (`bench/families.py`).
  --compile adds sdvae-compiled rows: `load_encoder(..., compile=True)`, warmed up (compiled) at the timed size.
  --bfloat16 adds the bfloat16 rows on a CPU without native bfloat16 too (they come by themselves where it is
  native): there its convs are emulated, so the times mean little, but the errors are those of a native CPU (the
  same products and float32 sums), except that the residual add rounds twice; diffusers' NCHW layout and OpenVINO
  are left out (400x slower emulated), the ratios are against diffusers-cl.
  time: best of a few runs after a warm-up at 64 px; peak: rise of resident memory (VmHWM) during the timed runs,
  model loaded; err: relative L2 error of the mean against float32 diffusers (eager).
  floor: the encoder's convolutions alone, channels-last float32, same shapes (what no float32 encoder can beat).
  openvino rows appear when the `bench` extra (openvino) is installed.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from common import cpu, cpu_line, parse_args, random_sd15_weights, rel_err, run_worker, timed

HERE = Path(__file__).resolve()
KINDS = ("diffusers", "diffusers-cl", "sdvae", "floor", "openvino")


def native_bf16(flags: set[str]) -> bool:
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def build(kind: str, weights: Path, dtype: torch.dtype):
    """A callable images -> mean for one implementation, loaded from the shared weights file."""
    from safetensors.torch import load_file

    from sdvae import VaeConfig

    config = VaeConfig.preset("sd15")
    state = load_file(weights)
    if kind in ("sdvae", "sdvae-compiled"):
        from sdvae import load_encoder

        enc = load_encoder(weights, family="sd15", dtype=dtype, compile=kind == "sdvae-compiled")
        return lambda x: enc.encode(x).mean
    from diffusers import AutoencoderKL

    ref = AutoencoderKL(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")})
    missing, _ = ref.load_state_dict(state, strict=False)
    assert not [k for k in missing if k.startswith(("encoder.", "quant_conv."))], missing
    ref = ref.to(dtype).eval()
    if kind == "diffusers":
        return lambda x: ref.encode(x).latent_dist.mean
    if kind == "diffusers-cl":
        ref = ref.to(memory_format=torch.channels_last)
        return lambda x: ref.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist.mean
    if kind == "openvino":
        import openvino as ov

        class Params(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vae = ref

            def forward(self, x):
                return self.vae.quant_conv(self.vae.encoder(x))

        model = ov.convert_model(Params().float().requires_grad_(False), example_input=torch.zeros(1, 3, 64, 64))
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32"}
        compiled = ov.Core().compile_model(model, "CPU", hint)
        return lambda x: torch.from_numpy(compiled(x.float().numpy())[0]).chunk(2, dim=1)[0]
    raise ValueError(kind)


def conv_floor(weights: Path, size: int, reps: int) -> float:
    """Seconds for the encoder's convolutions alone (channels-last float32, each on its whole map) at `size` px."""
    import copy

    from sdvae import load_encoder

    enc = load_encoder(weights, family="sd15")
    meta = copy.deepcopy(enc).to("meta")  # off the CPU the encoder runs whole maps: each conv's full input shape
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: shapes.append((name, a[0].shape)))
             for name, m in meta.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        meta.quant_conv(meta.encoder(torch.empty(1, 3, size, size, device="meta")))
    for h in hooks:
        h.remove()
    convs = dict(enc.named_modules())
    calls = [(convs[name], torch.randn(shape).contiguous(memory_format=torch.channels_last)) for name, shape in shapes]
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            for conv, x in calls:
                conv(x)
            best = min(best, time.perf_counter() - start)
    return best


def worker(kind: str, size: int, dtype_name: str, weights: Path, out: Path) -> None:
    dtype = getattr(torch, dtype_name)
    reps = 3 if size <= 256 else 2 if size <= 512 else 1
    if kind == "floor":
        out.write_text(json.dumps({"seconds": conv_floor(weights, size, reps)}))
        return
    run = build(kind, weights, dtype)
    x = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    with torch.no_grad():
        run(x if kind == "sdvae-compiled" else torch.zeros(1, 3, 64, 64, dtype=dtype))
        best, peak, mean = timed(lambda: run(x), reps)
    torch.save(mean.float(), out.with_suffix(".pt"))
    out.write_text(json.dumps({"seconds": best, "peak_mib": peak}))


def measure(kind: str, size: int, dtype: str, weights: Path, tmp: Path, threads: int) -> dict | str:
    return run_worker(HERE, [kind, str(size), dtype, str(weights)], tmp / f"{kind}-{size}-{dtype}.json", threads)


def main() -> None:
    args = parse_args([256, 512, 1024], worker_fields=4, flags=("--compile", "--bfloat16", "--families"))
    if args.worker:
        kind, size, dtype, weights, out = args.worker
        return worker(kind, int(size), dtype, Path(weights), Path(out))

    _, flags = cpu()
    native = native_bf16(flags)
    dtypes = ["float32"] + (["bfloat16"] if native or args.bfloat16 else [])
    import importlib.util

    kinds = KINDS if importlib.util.find_spec("openvino") else KINDS[:-1]
    kinds += ("sdvae-compiled",) if args.compile else ()
    tmp = Path(tempfile.mkdtemp(prefix="sdvae-bench-"))
    weights = random_sd15_weights(tmp)
    print(f"{cpu_line(args.threads)}, torch {torch.__version__}, SD 1.5 encoder, random weights, batch 1")
    if not native:
        print("no native bfloat16 on this CPU: " + ("bfloat16 rows emulated (times mean little), against diffusers-cl"
                                                    if args.bfloat16 else "bfloat16 rows skipped"))
    print("| size | dtype | impl | time s | peak MiB | time / diffusers | time / floor | peak / diffusers | err vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        floor = measure("floor", size, "float32", weights, tmp, args.threads)
        floor_s = floor["seconds"] if isinstance(floor, dict) else float("nan")
        base = None
        for dtype in dtypes:
            emulated = dtype == "bfloat16" and not native
            results = {k: measure(k, size, dtype, weights, tmp, args.threads) for k in kinds
                       if k != "floor" and not (emulated and k in ("diffusers", "openvino"))}
            base = base if base is not None else results["diffusers"]
            for kind, r in results.items():
                if isinstance(r, str):
                    print(f"| {size} | {dtype} | {kind} | failed: {r.splitlines()[-1]} | | | | | |")
                    continue
                ref = results["diffusers-cl" if emulated else "diffusers"]
                err = rel_err(r["mean"], base["mean"])
                print(f"| {size} | {dtype} | {kind} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | "
                      f"{r['seconds'] / ref['seconds']:.2f} | {r['seconds'] / floor_s:.2f} | "
                      f"{r['peak_mib'] / max(ref['peak_mib'], 1):.2f} | {err:.1e} |")
        shown = f"{floor_s:.2f}" if isinstance(floor, dict) else f"failed: {floor.splitlines()[-1]}"
        print(f"| {size} | float32 | conv floor | {shown} | | | 1.00 | | |")
    if args.families:
        import families

        print()
        families.table(args.sizes, args.threads)


if __name__ == "__main__":
    main()
