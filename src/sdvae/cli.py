"""The `sdvae` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .data.prepare import DEFAULT_MAX_PIXELS
from .util import COMPUTE_DTYPES


def _info(args: argparse.Namespace) -> int:
    from .checkpoint.loading import open_checkpoint

    ckpt = open_checkpoint(args.source, family=args.family)
    print(f"file:       {ckpt.path}")
    print(f"layout:     {ckpt.keymap.layout}" + (f" under {ckpt.keymap.prefix!r}" if ckpt.keymap.prefix else ""))
    print(f"parts:      {', '.join(ckpt.halves)}")
    print(f"dtype:      {', '.join(ckpt.dtypes)} on disk")
    print(f"family:     {ckpt.config.family or 'unknown'}")
    print(f"latents:    {_latent_shapes(ckpt.config)}")
    print(f"config:     {ckpt.config_origin}")
    for key, value in ckpt.config.to_diffusers().items():
        if not key.startswith("_") and not key.endswith("_types"):
            print(f"  {key}: {value}")
    return 0


def _latent_shapes(config) -> str:
    """The raw and the scaled latents' shapes, in words."""
    f, c, p = config.downsample_factor, config.latent_channels, (config.patch_size or (1,))[0]
    scaled = f"[{c * p * p}, H/{f * p}, W/{f * p}]"
    return (f"[{2 * c}, H/{f}, W/{f}] raw (mean and logvar), {scaled} scaled"
            + (f" ({p}x{p} patches, normalized by the bn statistics)" if p > 1 else ""))


def _resolution(text: str) -> int | tuple[int, int]:
    """`--resolution`: a side, or `width,height`."""
    try:
        sides = [int(part) for part in text.split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give a side (1024) or width,height (1216,832)")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(Path(args.out))


def _workers(args: argparse.Namespace) -> int:
    if args.workers is not None:
        return args.workers
    import torch

    on_cpu = args.device == "cpu" or args.device is None and not torch.cuda.is_available()
    return 0 if on_cpu else min(4, os.cpu_count() or 1)


def _encode(args: argparse.Namespace) -> int:
    from .data.encode import ENGINES, encode_dataset
    from .data.job import Runtime, Settings

    settings = Settings(resolution=args.resolution, buckets=args.buckets, crop=args.crop, flip=args.flip,
                        seed=args.seed, dtype=args.dtype, store_dtype=args.store_dtype, max_pixels=args.max_pixels,
                        format=args.format, arch=args.arch, bucket_no_upscale=args.bucket_no_upscale,
                        min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
                        bucket_reso_steps=args.bucket_reso_steps, alpha_mask=args.alpha_mask,
                        control_dir=args.control_dir, no_resize_control=args.no_resize_control)
    runtime = Runtime(batch_size=args.batch_size, device=args.device, tile_size=args.tile_size,
                      max_memory=args.max_memory, compile=args.compile)
    options = ({"workers": _workers(args)} if args.engine == "local" else
               {"address": args.ray_address, "actors": args.ray_actors, "actor_cpus": args.ray_actor_cpus})
    engine = ENGINES[args.engine](runtime, **options)
    counts = encode_dataset(args.inputs, args.model, args.output, settings, engine=engine, family=args.family,
                            shard_size=args.shard_size, resume=args.resume, overwrite=args.overwrite,
                            image_column=args.image_column, caption_column=args.caption_column)
    failed = counts["failed"] + counts["failed_before"]
    print(f"encoded {counts['encoded']}, failed {counts['failed']}, already stored {counts['skipped']}"
          + (f", failed in an earlier run {counts['failed_before']}" if counts["failed_before"] else "")
          + f": {args.output}" + (f" (failures in {args.output}/errors.jsonl)" if failed else ""))
    return 1 if failed else 0


def _decode(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint.loading import load_decoder, open_checkpoint
    from .data.dataset import LatentDataset
    from .data.images import save_format, tensor_to_image
    from .data.job import check_device

    check_device(args.device)
    picture_format = save_format(args.out)
    dataset = LatentDataset(args.dir, mode=True)
    model = args.model or dataset.manifest["model"]["file"]
    if args.model is None and not Path(model).exists():
        raise FileNotFoundError(f"{args.dir}: the checkpoint it was encoded with, {model}, is not there; "
                                "name it with --model")
    if args.model is not None:  # another file than the one that encoded them: it must be of the same family
        found, wanted = open_checkpoint(args.model).config.family, dataset.manifest.get("family")
        if None not in (found, wanted) and found != wanted:
            raise ValueError(f"{args.model}: a {found} VAE, but {args.dir} holds {wanted} latents; decode them with "
                             f"a {wanted} decoder (they were encoded with {dataset.manifest['model']['file']})")
    decoder = load_decoder(model, config=dataset.config, device=args.device)
    pictures = []
    for index in args.index:
        if not 0 <= index < len(dataset):
            raise ValueError(f"{args.dir}: index {index} is out of range (the dataset holds {len(dataset)} latents)")
        with torch.no_grad():
            latent = dataset.scaling.unscale(dataset[index]["latent"][None])  # as the dataset scaled it
            pictures.append(decoder.decode(latent.to(decoder.device))[0])
    height = max(p.shape[1] for p in pictures)
    grid = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, height - p.shape[1]), value=1.0) for p in pictures], 2)
    tensor_to_image(grid).save(args.out, picture_format)
    print(f"decoded {len(pictures)} latent(s) of {args.dir} to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdvae", description="Stable-Diffusion VAE latents, exactly as diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the whole path on a random-weight checkpoint and generated images")
    demo.add_argument("--out", default="sdvae-demo", help="folder for the checkpoint and images (default: %(default)s)")
    demo.set_defaults(run=_demo)
    info = commands.add_parser("info", help="what a checkpoint is: layout, parts, dtype, family and config")
    info.add_argument("source", help="a .safetensors/.ckpt/.bin file, a diffusers or pipeline folder, or a hub id")
    info.add_argument("--family", help="the family preset to assume (sd15, sd2, sdxl, sd3, flux, flux2, playground, "
                                       "cogview, qwenimage)")
    info.set_defaults(run=_info)

    encode = commands.add_parser(
        "encode", help="turn images into a sharded latent dataset",
        description="Encode images into a sharded latent dataset (safetensors shards, Parquet metadata).",
        epilog="exit status: 0 when every input was encoded; 1 when some failed, in this run or an earlier one "
               "(each a line of DIR/errors.jsonl saying why); 2 when an error stopped the run, named on stderr (bad "
               "arguments or device, no images, an input that is not there, a list that is not text, a checkpoint "
               "that cannot be loaded, a Parquet image column without image bytes, an output holding other things "
               "or written by another run, a write that failed such as a full disk; complete shards are kept for "
               "--resume); 130 when interrupted (the same); 143 when terminated by SIGTERM (the same); 141 when the "
               "output went into a pipe that closed early.")
    encode.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (recursive), text files of paths, WebDataset .tar shards, "
                             ".parquet files, or brace patterns like data/{00000..00099}.tar")
    encode.add_argument("--image-column", help="Parquet column with the encoded images (default: image, jpg, png or "
                        "webp, else the one binary column)")
    encode.add_argument("--caption-column", help="Parquet column with captions (default: caption, text or txt)")
    encode.add_argument("--model", required=True, help="VAE checkpoint: file, diffusers/pipeline folder or hub id")
    encode.add_argument("--output", required=True, help="dataset folder to write")
    encode.add_argument("--resolution", type=_resolution, metavar="SIDE|W,H",
                        help="target size in pixels, a square's side or width,height (default: the config's "
                             "sample_size); refused before anything is written when a target's pixels exceed "
                             "--max-pixels or it cannot be encoded within --max-memory")
    encode.add_argument("--format", choices=("sdvae", "kohya", "musubi"), default="sdvae",
                        help="kohya: also write kohya sd-scripts' latent cache beside each image (SD 1.x/2.x, SDXL, "
                             "SD3, FLUX.1); musubi: also write musubi-tuner's latent cache files into --output "
                             "(FLUX.2, Qwen-Image, Z-Image); each by its trainer's buckets and resize (see the "
                             "README); default: %(default)s only")
    encode.add_argument("--arch", help="the trainer's name for the model: with --format musubi the architecture in "
                                       "its files (f2d, f2k4b, f2k9b, qi, qie, qil, zi; default: the VAE family's base "
                                       "model); with --format kohya it must be the family's (sd, sdxl, sd3, flux)")
    encode.add_argument("--control-dir", metavar="DIR",
                        help="with --format musubi: the control images (edit models' references) in DIR, matched to "
                             "each image and stored in its cache file as musubi-tuner's control_directory does")
    encode.add_argument("--no-resize-control", action="store_true",
                        help="with --control-dir: controls keep their size rounded down to 16, as musubi-tuner's "
                             "no_resize_control (default: resized and cropped to the image's bucket)")
    encode.add_argument("--buckets", action="store_true",
                        help="aspect-ratio buckets of about the resolution's area (default: one target, the "
                             "resolution); sdvae's have sides multiples of 64, the trainers' are their own")
    encode.add_argument("--bucket-no-upscale", action="store_true",
                        help="with --format kohya or musubi and --buckets: images no larger than the area keep their "
                             "size, rounded down to the bucket step, as the trainer's bucket_no_upscale")
    encode.add_argument("--min-bucket-reso", type=int,
                        help="with --format kohya --buckets: sd-scripts' min_bucket_reso (default: 256)")
    encode.add_argument("--max-bucket-reso", type=int,
                        help="with --format kohya --buckets: sd-scripts' max_bucket_reso (default: 1024)")
    encode.add_argument("--bucket-reso-steps", type=int,
                        help="with --format kohya --buckets: sd-scripts' bucket_reso_steps (default: 64)")
    encode.add_argument("--alpha-mask", action="store_true",
                        help="with --format kohya: store the alpha channel as sd-scripts' alpha_mask (train with its "
                             "--alpha_mask then; without it, leave this off)")
    encode.add_argument("--crop", choices=("center", "random"), default="center",
                        help="crop position (random is seeded)")
    encode.add_argument("--flip", action="store_true", help="also store the latent of the horizontally flipped image")
    encode.add_argument("--batch-size", type=int, default=8,
                        help="images per forward pass; same latents at any size (default: %(default)s)")
    encode.add_argument("--device", help="torch device (default: cuda when there is a GPU, else cpu)")
    encode.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                        help="compute dtype (default: %(default)s, exact). bfloat16: the mean within about 1e-2 "
                             "of float32's, faster on CPUs with AMX or AVX512_BF16 and on GPUs, emulated and slower "
                             "than float32 on other CPUs (bench/README.md has the figures). float16 (GPUs) falls "
                             "back to float32 on overflow")
    encode.add_argument("--store-dtype", choices=COMPUTE_DTYPES, default="float32",
                        help="dtype of the stored mean and logvar (default: %(default)s)")
    encode.add_argument("--family", help="family preset when the checkpoint does not say (sd15, sdxl, sd3, flux, "
                                         "flux2, qwenimage, ...)")
    encode.add_argument("--seed", type=int, default=0, help="seed for random crops (default: %(default)s)")
    encode.add_argument("--workers", type=int,
                        help="processes decoding images while the model runs; 0 decodes inline (default: 0 when the "
                             "model runs on the CPU, where it needs every core, else up to 4)")
    encode.add_argument("--shard-size", type=int, help="images per shard (default: about 64 MB of latents)")
    encode.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="larger images are refused as decompression bombs, and larger --resolution "
                             "targets (default: %(default)s)")
    encode.add_argument("--tile-size", type=int,
                        help="encode in exact tiles of this many pixels, same latents: alone, in the least memory "
                             "tiles of that size allow (activations in scratch files in $SDVAE_SCRATCH, or "
                             "recomputed where SDVAE_SCRATCH=none: slower than untiled); with --max-memory, in the "
                             "fastest plan of that size within it")
    encode.add_argument("--max-memory",
                        help="memory budget of the encoder, e.g. 4GiB: the rise of resident memory while it runs "
                             "stays within it; larger images are encoded in exact tiles, with scratch files in "
                             "$SDVAE_SCRATCH or recomputed stages (SDVAE_SCRATCH=none) where tiles alone do not "
                             "fit (default: the memory free on the device)")
    encode.add_argument("--compile", action="store_true",
                        help="run the encoder through torch.compile: for GPUs (on the CPU the default path is faster); "
                             "the first batch of each shape compiles")
    encode.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="run here, or on a Ray cluster (pip install 'sdvae[ray]') (default: %(default)s)")
    encode.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else the one `ray start` "
                        "made here, else a new local instance)")
    encode.add_argument("--ray-actors", type=int,
                        help="encoder actors (default: one per GPU in the cluster, else 1)")
    encode.add_argument("--ray-actor-cpus", type=float, default=1.0,
                        help="CPUs each encoder actor reserves, and its torch threads (rounded up); decoding "
                             "tasks take 0.5 CPU each (default: %(default)s)")
    encode.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --output")
    encode.add_argument("--overwrite", action="store_true", help="replace latents already in --output")
    encode.set_defaults(run=_encode)

    decode = commands.add_parser("decode", help="decode stored latents back to an image (several: a row)")
    decode.add_argument("dir", help="a dataset folder written by sdvae encode")
    decode.add_argument("--index", type=int, nargs="+", default=[0], help="which latents (default: 0)")
    decode.add_argument("--out", default="preview.png", help="image to write (default: %(default)s)")
    decode.add_argument("--model", help="checkpoint with the decoder (default: the one the dataset was encoded with)")
    decode.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    decode.set_defaults(run=_decode)
    return parser


def _message(error: BaseException) -> str:
    """An error as one line that starts with what it is about: an OSError's file first, where Python puts it
    last (`[Errno 28] No space left on device: 'x'`), or not at all."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush into a closed pipe says nothing."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, `kill`): unwound like Ctrl-C, so open files are closed and removed."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main else None
    try:
        return _run(args)
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """The command, its errors as messages and exit statuses (README, "Exit status")."""
    try:
        status = args.run(args)
        sys.stdout.flush()  # (a closed pipe fails here, not at exit)
        return status
    except BrokenPipeError:  # `sdvae info X | head -1`: the reader has what it wanted
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except (ValueError, OSError, ImportError, ConnectionError) as e:
        print(f"sdvae: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        kept = " (complete shards are kept: the same command with --resume goes on)" if args.command == "encode" else ""
        terminated = isinstance(e, Terminated)
        print(f"sdvae: {'terminated' if terminated else 'interrupted'}{kept}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
