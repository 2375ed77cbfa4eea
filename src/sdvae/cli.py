"""The `sdvae` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from .loading import open_checkpoint

    ckpt = open_checkpoint(args.source, family=args.family)
    print(f"file:       {ckpt.path}")
    print(f"layout:     {ckpt.keymap.layout}" + (f" under {ckpt.keymap.prefix!r}" if ckpt.keymap.prefix else ""))
    print(f"parts:      {', '.join(ckpt.halves)}")
    print(f"dtype:      {', '.join(ckpt.dtypes)} on disk")
    print(f"config:     {ckpt.config_origin}")
    for key, value in ckpt.config.to_diffusers().items():
        if not key.startswith("_") and not key.endswith("_types"):
            print(f"  {key}: {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdvae", description="Stable-Diffusion VAE latents, exactly as diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the whole path on a random-weight checkpoint and generated images")
    demo.add_argument("--out", default="sdvae-demo", help="folder for the checkpoint and images (default: %(default)s)")
    demo.set_defaults(run=_demo)
    info = commands.add_parser("info", help="what a checkpoint is: layout, parts, dtype, family and config")
    info.add_argument("source", help="a .safetensors/.ckpt/.bin file, a diffusers or pipeline folder, or a hub id")
    info.add_argument("--family", help="the family preset to assume (sd15, sd2, sdxl, sd3, flux, playground, cogview)")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"sdvae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
