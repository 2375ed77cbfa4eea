"""Find a VAE in whatever a user has on disk (or in the Hugging Face cache), work out its config, and load it."""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..model.config import CLASS_NAMES, PRESETS, WAN_CLASSES, VaeConfig
from ..model.scaling import LatentScaling, LatentStats
from ..util import COMPUTE_DTYPES, SAFETENSORS_DTYPES, why_missing
from ..vae.base import VaeModule
from ..vae.decoder import VaeDecoder
from ..vae.encoder import VaeEncoder
from .convert import convert_state_dict, load_weights
from .keys import KeyMap, map_keys

log = logging.getLogger("sdvae")

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# Keys beside the VAE that tell which model a whole single-file checkpoint belongs to.
FAMILY_MARKERS = {
    "sdxl": ("conditioner.embedders.",),
    "sd2": ("cond_stage_model.model.",),
    "sd15": ("cond_stage_model.transformer.",),
    "sd3": ("model.diffusion_model.joint_blocks.", "text_encoders."),
    "flux": ("model.diffusion_model.double_blocks.", "double_blocks."),
}
# The family assumed where the weights fit several, and a warning says so.
DEFAULT_FAMILY = {4: "sd15", 16: "flux", 32: "flux2"}
DTYPES = {name: getattr(torch, name) for name in (*COMPUTE_DTYPES, "float64")}
_SAFETENSORS_NAMES = {getattr(torch, name): short for short, name in SAFETENSORS_DTYPES.items()}
# The fields that say which family a VAE is, whatever its widths (a family's scaling needs them to match).
_IDENTITY_FIELDS = ("network", "latent_channels", "use_quant_conv", "use_post_quant_conv", "patch_size")
_ARCH_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "patch_size", "network")


class SafetensorsFile(Mapping):
    """A safetensors file as a read-only mapping that reads a tensor only when it is asked for."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._file.get_slice(key).get_dtype())


def _shape(tensors: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tensors.shape(key) if isinstance(tensors, SafetensorsFile) else tuple(tensors[key].shape)


def _dtype(tensors: Mapping[str, Any], key: str) -> str:
    if isinstance(tensors, SafetensorsFile):
        return tensors.dtype(key)
    return _SAFETENSORS_NAMES.get(
        tensors[key].dtype, str(tensors[key].dtype))


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin/.ckpt/.pt` state dict via `torch.load(weights_only=True)`; anything needing more is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        message = str(e)
        refused = re.search(r"GLOBAL (\S+)", message)  # torch's safe unpickler names what it will not load
        if refused:
            raise ValueError(f"{path}: refused on purpose, for safety: unpickling it would call {refused[1]}, "
                             "and a pickle that calls code can run any code; sdvae unpickles tensors only. Convert "
                             "the checkpoint to .safetensors where you trust it (or get a .safetensors release) and "
                             "load that") from e
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: Please |\n\n|$)", message, re.DOTALL)
        lines = [line for line in message.splitlines() if line.strip() and "weights_only" not in line]
        reason = (found[1] if found else lines[0] if lines else "the safe unpickler cannot read it").strip()
        raise ValueError(f"{path}: cannot read this checkpoint (not a PyTorch checkpoint, truncated or corrupt?): "
                         f"{reason}") from e
    except Exception as e:  # the unpickler fails on junk bytes with many types (KeyError, EOFError, RuntimeError...)
        raise ValueError(f"{path}: cannot read this checkpoint (not a PyTorch checkpoint, truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    other = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise ValueError(f"{path}: expected a state dict of tensors, but {other!r} holds a "
                         f"{type(obj[other]).__name__}")
    return obj


def read_tensors(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of one checkpoint file (safetensors lazily; pickles with weights_only), told by its suffix, or
    by its first bytes under another suffix (FLUX's `ae.sft`)."""
    kind = {".safetensors": "safetensors", **dict.fromkeys(PICKLE_SUFFIXES, "pickle")}.get(path.suffix) or _sniff(path)
    if kind == "safetensors":
        return SafetensorsFile(path)
    if kind == "pickle":
        return read_pickle(path)
    raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}, and its bytes are neither safetensors nor a "
                     f"PyTorch pickle; expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")


def _sniff(path: Path) -> str | None:
    """'safetensors' (an 8-byte header length, then a JSON object), 'pickle' (a zip archive, or pickle's protocol
    byte), or None."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    return "pickle" if zipfile.is_zipfile(path) or head[:1] == b"\x80" else None


def _config_beside(weights: Path) -> tuple[VaeConfig, Path] | None:
    """The diffusers AutoencoderKL (or AutoencoderKLFlux2) config.json beside `weights` and its path, or None where
    there is none to use.

    Beside diffusers-named weights (`diffusion_pytorch_model.*`) config.json describes them: anything but such a
    config is an error. Beside another file it may be any model's (a download folder): one that is not
    an AutoencoderKL config is passed over with a warning naming it, and the config is read from the weights.
    """
    path = weights.parent / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise ValueError(f"{path}: cannot read config: {e}") from e
    kind = data.get("_class_name", "AutoencoderKL") if isinstance(data, dict) else None
    if kind in CLASS_NAMES + WAN_CLASSES:
        try:
            return VaeConfig.from_diffusers(data), path
        except ValueError as e:
            problem = str(e)
    elif kind is None:
        problem = f"a JSON {type(data).__name__}, not an object"
    else:
        problem = (f"it names the model class {kind}, not {', '.join(CLASS_NAMES + WAN_CLASSES)} (the VAEs of "
                   "the Stable-Diffusion, FLUX and Qwen-Image families)")
    if weights.name in WEIGHT_NAMES:
        raise ValueError(f"{path}: not the diffusers AutoencoderKL config of {weights.name}: {problem}")
    warnings.warn(f"{path}: not a diffusers AutoencoderKL config ({problem}); passed over: the config of "
                  f"{weights.name} is read from its weights", stacklevel=4)
    return None


def _resolve_folder(folder: Path) -> Path:
    if (folder / "vae").is_dir() and not (folder / "config.json").is_file():
        return _resolve_folder(folder / "vae")
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no VAE weights here: expected a diffusers VAE folder "
                            f"(config.json + {' or '.join(WEIGHT_NAMES[:1] + WEIGHT_NAMES[2:3])}) or a pipeline "
                            "folder with vae/")


def _from_hub(repo_id: str) -> Path:
    """A hub repo (`owner/name`, or `owner/name/file.safetensors`) from the Hugging Face cache or the hub."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise ImportError(f"{repo_id}: no such local file or folder; to load it as a Hugging Face repo id, "
                          "install huggingface_hub: pip install 'sdvae[hub]'") from None
    owner, name, *rest = repo_id.split("/")
    repo = f"{owner}/{name}"
    try:
        if rest:
            return Path(hf_hub_download(repo, "/".join(rest)))
        patterns = [f"{sub}{f}" for sub in ("", "vae/") for f in ("config.json", *WEIGHT_NAMES[:1], WEIGHT_NAMES[2])]
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id}: no such local file or folder, and as a repo id it is not in the local Hugging Face cache "
            f"while the hub cannot be reached ({e}). Download it where "
            f"there is network (`huggingface-cli download {repo}`) or pass a local file or folder."
        ) from e
    except (HfHubHTTPError, HFValidationError) as e:
        raise FileNotFoundError(f"{repo_id}: no such local file or folder, and the Hugging Face hub "
                                f"refused it as a repo id: {e}") from e


def _repo_id(source: str) -> bool:
    """Whether a path that does not exist reads as a hub id (`owner/name`, or `owner/name/file`): names of word
    characters, `-` and `.` that neither start nor end with those two, and an owner that is no local folder (there
    the user means a file in it)."""
    name = r"\w(?:[\w.-]*\w)?"
    return (re.fullmatch(rf"{name}/{name}(/[\w./-]+)?", source) is not None
            and not Path(source.split("/")[0]).is_dir())


def resolve_source(source: str | Path) -> Path:
    """The weights file a source points to: the file, the weights of a diffusers or pipeline folder, or a hub id's."""
    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, str) and _repo_id(source):
            path = _from_hub(source)
        else:
            raise FileNotFoundError(f"{source}: {why_missing(path)}")
    if path.is_dir():
        return _resolve_folder(path)
    if not path.is_file():  # (reading one would block, or never end)
        raise ValueError(f"{source}: not a regular file (a FIFO, device or socket); a checkpoint is a file or a folder")
    return path


def _infer_architecture(tensors: Mapping[str, Any], keymap: KeyMap) -> dict[str, Any]:
    """Widths, depth and optional parts of the VAE, read off tensor shapes (the GroupNorm group count is not)."""
    names = keymap.names

    def shape(key: str) -> tuple[int, ...]:
        return _shape(tensors, names[key])

    if any(k.endswith(".attentions.0.to_qkv.weight") for k in names):
        return _infer_wan(names, shape)
    arch: dict[str, Any] = {"network": "autoencoder_kl"}
    if "encoder.conv_in.weight" in names:
        arch["in_channels"] = shape("encoder.conv_in.weight")[1]
        arch["latent_channels"] = shape("encoder.conv_out.weight")[0] // 2
        blocks = sorted({int(m[1]) for k in names if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        arch["block_out_channels"] = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]
                                           for i in blocks)
        first = "encoder.down_blocks.0.resnets."
        arch["layers_per_block"] = len({k.split(".")[4] for k in names if k.startswith(first)})
    if "decoder.conv_in.weight" in names:
        widths = _decoder_arch(names, shape, arch)
        if arch.setdefault("block_out_channels", widths) != widths:
            arch["decoder_block_out_channels"] = widths  # (FLUX.2 klein's narrower decoder)
    for half, conv in (("encoder", "quant_conv"), ("decoder", "post_quant_conv")):
        if f"{half}.conv_in.weight" in names:  # either tensor says the conv is there (a missing one is an error)
            arch[f"use_{conv}"] = f"{conv}.weight" in names or f"{conv}.bias" in names
    arch["mid_block_add_attention"] = any(".mid_block.attentions.0." in k for k in names)
    if any(k.startswith("bn.running_") for k in names):  # FLUX.2's latent statistics, of its 2x2 patches
        arch["patch_size"] = (2, 2)
    return arch


def _infer_wan(names: Mapping[str, str], shape: Any) -> dict[str, Any]:
    """The Wan network's widths and depth, read off the shapes: the encoder's flat list of residual blocks, split
    into levels at its downsamples (else the decoder's up blocks)."""
    arch: dict[str, Any] = {"network": "wan", "use_quant_conv": True, "use_post_quant_conv": True,
                            "mid_block_add_attention": True}
    if "encoder.conv_in.weight" in names:
        ids = sorted({int(m[1]) for k in names if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        levels: list[list[int]] = [[]]
        for i in ids:
            if f"encoder.down_blocks.{i}.resample.1.weight" in names:
                levels.append([])
            else:
                levels[-1].append(shape(f"encoder.down_blocks.{i}.conv1.weight")[0])
        arch.update(in_channels=shape("encoder.conv_in.weight")[1], latent_channels=shape(
            "encoder.conv_out.weight")[0] // 2, block_out_channels=tuple(level[-1] for level in levels),
            layers_per_block=len(levels[0]))
    if "decoder.conv_in.weight" in names:
        arch.setdefault("block_out_channels", _decoder_arch(names, shape, arch))
    return arch


def _decoder_arch(names: Mapping[str, str], shape: Any, arch: dict[str, Any]) -> tuple[int, ...]:
    """Read the decoder's output width into `arch`, and its latent width and depth where the encoder did not say
    them; returns its block widths, in the encoder's order (both networks name their up blocks alike)."""
    arch["out_channels"] = shape("decoder.conv_out.weight")[0]
    arch.setdefault("latent_channels", shape("decoder.conv_in.weight")[1])
    arch.setdefault("layers_per_block",
                    len({k.split(".")[4] for k in names if k.startswith("decoder.up_blocks.0.resnets.")}) - 1)
    blocks = sorted({int(m[1]) for k in names if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    return tuple(shape(f"decoder.up_blocks.{i}.resnets.0.conv1.weight")[0] for i in reversed(blocks))


def _infer_family(keys: list[str], arch: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The family for these weights, and every family whose architecture fits them.

    A whole checkpoint's other keys (text encoders, UNet) settle it; a bare VAE that fits several families gets
    the documented default for its latent width.
    """
    fits = [name for name, cfg in PRESETS.items()
            if all(getattr(cfg, f) == arch[f] for f in _ARCH_FIELDS if f in arch)]
    marked = [name for name in fits if any(k.startswith(FAMILY_MARKERS.get(name, ("\0",))) for k in keys)]
    if len(marked) == 1:
        return marked[0], marked
    if len(fits) == 1:
        return fits[0], fits
    if not fits and arch.get("patch_size"):  # bn statistics: FLUX.2's alone, whatever the widths
        return "flux2", ["flux2"]
    if not fits and arch.get("network") == "wan":  # the Wan network: Qwen-Image's (= Wan 2.1's), whatever the widths
        return "qwenimage", ["qwenimage"]
    default = DEFAULT_FAMILY.get(arch.get("latent_channels"))
    return (default if default in fits else None), fits


@dataclass(frozen=True)
class Checkpoint:
    """A VAE found on disk: where, its tensors (read lazily), how its keys map, and the config chosen for it."""

    path: Path
    tensors: Mapping[str, torch.Tensor]
    keymap: KeyMap
    config: VaeConfig
    config_origin: str

    @property
    def halves(self) -> tuple[str, ...]:
        """Which parts the file holds: 'encoder' and/or 'decoder'."""
        return tuple(h for h in ("encoder", "decoder") if f"{h}.conv_in.weight" in self.keymap.names)

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The tensor dtypes stored on disk for the VAE (e.g. ('F16',))."""
        return tuple(sorted({_dtype(self.tensors, src) for src in self.keymap.names.values()}))

    def scaling(self) -> LatentScaling:
        """The latent scaling of this VAE: the config's, with FLUX.2's `bn` statistics read from the file."""
        if self.config.patch_size is None:
            return LatentScaling.of(self.config)
        stats = LatentStats.of(self.config)
        expected = {f"bn.{name}": buffer.shape for name, buffer in stats.state_dict().items()}
        tensors, _ = convert_state_dict(self.tensors, expected, set(expected), source=str(self.path))
        stats.load_state_dict({name.removeprefix("bn."): tensor for name, tensor in tensors.items()})
        return LatentScaling.of(self.config, stats)


def open_checkpoint(source: str | Path, *, config: VaeConfig | dict | str | Path | None = None,
                    family: str | None = None) -> Checkpoint:
    """Locate the weights and settle the config: `config` > `family` > config.json beside them > inferred."""
    path = resolve_source(source)
    tensors = read_tensors(path)
    keys = list(tensors.keys())
    keymap = map_keys(keys)
    if not keymap.names:
        raise ValueError(f"{path}: no VAE tensors found: expected keys such as encoder.conv_in.weight "
                         "(bare, or under first_stage_model. or vae.)")
    if config is not None:
        cfg = config if isinstance(config, VaeConfig) else VaeConfig.from_diffusers(config)
        return Checkpoint(path, tensors, keymap, cfg, "config argument")
    if family is not None:
        return Checkpoint(path, tensors, keymap, _family_config(path, tensors, keymap, family), f"family={family!r}")
    beside = _config_beside(path)
    if beside is not None:
        return Checkpoint(path, tensors, keymap, beside[0], str(beside[1]))
    try:
        arch = _infer_architecture(tensors, keymap)
    except KeyError as e:
        raise ValueError(f"{path}: incomplete VAE: {keymap.source_key(e.args[0])} is missing "
                         "(as read from the other tensors' names)") from None
    name, candidates = _infer_family(keys, arch)
    if "decoder_block_out_channels" in arch and name != "flux2":
        raise ValueError(f"{path}: the decoder's widths {list(arch['decoder_block_out_channels'])} differ from the "
                         f"encoder's {list(arch['block_out_channels'])}, which only FLUX.2's VAE allows; pass config=")
    if name is None:
        warnings.warn(f"{path}: the weights fit no known family; using scaling_factor "
                      f"{VaeConfig.scaling_factor} and shapes read from the weights. Pass config= if that is wrong.",
                      stacklevel=3)
        return Checkpoint(path, tensors, keymap, VaeConfig(**arch), "inferred (no family)")
    cfg = PRESETS[name].replace(**arch)
    certain = len(candidates) == 1
    if not certain:
        warnings.warn(f"{path}: the weights do not say which of {', '.join(candidates)} they belong to; "
                      f"assuming {name} (scaling_factor {cfg.scaling_factor}, shift_factor {cfg.shift_factor}). "
                      f"Pass family=... or config=... to choose.", stacklevel=3)
    return Checkpoint(path, tensors, keymap, cfg, f"inferred ({name}{'' if certain else ', assumed'})")


def _family_config(path: Path, tensors: Mapping[str, Any], keymap: KeyMap, family: str) -> VaeConfig:
    """The `family` preset with the widths and depth of the weights; refused (naming what differs) where their
    shapes say another family."""
    preset = VaeConfig.preset(family)
    try:
        arch = _infer_architecture(tensors, keymap)
    except KeyError:
        return preset  # (incomplete: loading names the missing tensor)
    fits = _infer_family(list(tensors.keys()), arch)[1]
    arch.setdefault("patch_size", preset.patch_size)  # (where bn is missing, loading names it)
    wrong = [f for f in _IDENTITY_FIELDS if f in arch and arch[f] != getattr(preset, f)]
    if wrong:
        raise ValueError(f"{path}: not a {family} VAE: its weights have "
                         f"{', '.join(f'{f} {arch[f]!r}' for f in wrong)}, where {family} has "
                         f"{', '.join(f'{f} {getattr(preset, f)!r}' for f in wrong)}"
                         f"{f'; they fit {chr(44).join(fits)}' if fits else ''}")
    return preset.replace(**arch)


M = TypeVar("M", bound=VaeModule)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A compute dtype from a torch.dtype or its name (None: float32); others are refused here, not mid-encode."""
    found = DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else (dtype or torch.float32)
    if found not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (a torch.dtype or its name), got {dtype!r}")
    return found


def _load(cls: type[M], source: str | Path, config: VaeConfig | dict | str | Path | None, family: str | None,
          device: torch.device | str | None, dtype: torch.dtype | str | None, strict: bool, compile: bool) -> M:
    dtype = as_dtype(dtype)
    ckpt = open_checkpoint(source, config=config, family=family)
    half = "encoder" if cls is VaeEncoder else "decoder"
    if half not in ckpt.halves:
        raise ValueError(f"{ckpt.path}: holds no VAE {half}, only the {' and '.join(ckpt.halves)}")
    with torch.device("meta"):
        module = cls(ckpt.config).to(dtype)
    report = load_weights(module, ckpt.tensors, strict=strict, source=str(ckpt.path))
    module.load_report = report
    log.info("%s from %s (%s): %s", cls.__name__, ckpt.path, ckpt.config_origin, report.summary())
    module = module.to(device or "cpu").eval().requires_grad_(False)
    return module.compile_network() if compile else module


def load_encoder(source: str | Path, *, config: VaeConfig | dict | str | Path | None = None,
                 family: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, strict: bool = False, compile: bool = False) -> VaeEncoder:
    """Load a `VaeEncoder` from a file, a diffusers or pipeline folder, or a hub id; reads only its tensors.

    The config comes from `config`, else the `family` preset (sd15, sd2, sdxl, sd3, flux, flux2, playground, cogview,
    qwenimage), else the diffusers config.json beside the weights, else the weights themselves (warning where the
    family, and so the scaling factor, is ambiguous). `dtype` (a torch.dtype or its name) defaults to float32.
    `.load_report` says what was dropped. `compile=True` runs the network through torch.compile
    (`VaeModule.compile_network`).
    """
    return _load(VaeEncoder, source, config, family, device, dtype, strict, compile)


def load_decoder(source: str | Path, *, config: VaeConfig | dict | str | Path | None = None,
                 family: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, strict: bool = False, compile: bool = False) -> VaeDecoder:
    """Load a `VaeDecoder`, as `load_encoder` does."""
    return _load(VaeDecoder, source, config, family, device, dtype, strict, compile)
