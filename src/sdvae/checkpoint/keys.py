"""Every checkpoint layout's key names, mapped onto diffusers' AutoencoderKL names. The one place for renaming.

Layouts: diffusers (current and deprecated attention names), CompVis/LDM, Black Forest Labs' FLUX.2 `ae.safetensors`
(LDM names with the quant convs inside the halves, `bn.*` statistics), Wan 2.1's original names
(`Wan2.1_VAE.pth`, ComfyUI's `qwen_image_vae.safetensors`), each bare or under a `vae.` or `first_stage_model.`
prefix (whole pipeline or SD/SDXL checkpoints).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

PREFIXES = ("first_stage_model.", "vae.")
HALVES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")
# Tensors of the VAE that inference never reads: they go into the load report, and strict loading accepts them.
UNUSED = re.compile(r"bn\.num_batches_tracked|.*\.time_conv\.(weight|bias)")
# FLUX.2's original names for the quant convs (flux2 `src/flux2/autoencoder.py`: the encoder and decoder hold them).
_INNER_QUANT = {"encoder.quant_conv": "quant_conv", "decoder.post_quant_conv": "post_quant_conv"}

_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LDM_RESNET = {"nin_shortcut": "conv_shortcut"}
# Attention projections that LDM files store as 1x1 convs `[C, C, 1, 1]`.
_ATTENTION_WEIGHT = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


@dataclass(frozen=True)
class KeyMap:
    """How a checkpoint's keys read as diffusers keys.

    `names` maps each diffusers key to the source key that holds it; `prefix` is the prefix that was stripped
    and `layout` is "diffusers", "ldm" or "bfl" (FLUX.2's; with "+deprecated-attention" where those names were
    seen).
    """

    names: dict[str, str]
    prefix: str
    layout: str
    num_up: int = 0  # the LDM decoder's up blocks, which it numbers in reverse
    group: int = 0  # entries of one up block in Wan's flat `decoder.upsamples` list (its resnets and upsampler)

    def source_key(self, key: str) -> str:
        """The name diffusers key `key` has in the checkpoint, or would have there (to name a missing tensor)."""
        if key in self.names:
            return self.names[key]
        if self.layout == "wan":
            return self.prefix + wan_name(key, self.group)
        if self.layout.startswith("bfl"):
            key = _swap(key, _inverse(_INNER_QUANT))
        return self.prefix + (ldm_name(key, self.num_up) if self.layout.startswith(("ldm", "bfl")) else key)


def detect_prefix(keys: Iterable[str]) -> str:
    """The prefix under which the VAE lives: `first_stage_model.` in SD checkpoints, `vae.` in pipelines, or ''."""
    keys = list(keys)
    for prefix in PREFIXES:
        if any(k.startswith(prefix + half) for k in keys for half in HALVES):
            return prefix
    return ""


def is_ldm(keys: Iterable[str]) -> bool:
    """True for CompVis/LDM names (`encoder.down.0.block.0...`, `decoder.up.0...`, `encoder.mid.attn_1...`)."""
    pattern = re.compile(r"^(encoder\.(down\.\d|mid\.)|decoder\.(up\.\d|mid\.))")
    return any(pattern.match(k) for k in keys)


# Every renamed tensor below `encoder.`/`decoder.`, as (LDM name, diffusers name). Placeholders: {d} down block,
# {u} up block (LDM counts up blocks from the bottom, diffusers from the top), {j} resnet, {m} mid resnet
# (LDM block_1/2, diffusers 0/1), {r} resnet layer, {a} attention layer, {p} weight or bias.
_RULES = (
    ("down.{d}.block.{j}.{r}.{p}", "down_blocks.{d}.resnets.{j}.{r}.{p}"),
    ("down.{d}.downsample.conv.{p}", "down_blocks.{d}.downsamplers.0.conv.{p}"),
    ("up.{u}.block.{j}.{r}.{p}", "up_blocks.{u}.resnets.{j}.{r}.{p}"),
    ("up.{u}.upsample.conv.{p}", "up_blocks.{u}.upsamplers.0.conv.{p}"),
    ("mid.block_{m}.{r}.{p}", "mid_block.resnets.{m}.{r}.{p}"),
    ("mid.attn_1.{a}.{p}", "mid_block.attentions.0.{a}.{p}"),
    ("norm_out.{p}", "conv_norm_out.{p}"),
)
_PLACEHOLDER = {"d": r"\d+", "u": r"\d+", "j": r"\d+", "m": r"\d+", "r": r"\w+", "a": r"[\w.]+", "p": r"\w+"}


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    escaped = template.replace(".", r"\.")
    return re.compile(re.sub(r"\{(\w)\}", lambda m: f"(?P<{m[1]}>{_PLACEHOLDER[m[1]]})", escaped))


def _translate(placeholder: str, value: str, num_blocks: int, to_diffusers: bool) -> str:
    if placeholder == "u":
        return str(num_blocks - 1 - int(value))
    if placeholder == "m":
        return str(int(value) + (-1 if to_diffusers else 1))
    if placeholder in ("r", "a"):
        table = _LDM_RESNET if placeholder == "r" else _LDM_ATTENTION
        table = table if to_diffusers else {v: k for k, v in table.items()}
        return table.get(value, value)
    return value


def _rename(key: str, num_blocks: int, to_diffusers: bool) -> str:
    """Rename one key between the LDM and diffusers layouts through `_RULES`; other keys pass unchanged."""
    half, _, rest = key.partition(".")
    if half not in ("encoder", "decoder"):
        return key
    for ldm, diffusers in _RULES:
        source, target = (ldm, diffusers) if to_diffusers else (diffusers, ldm)
        if m := _pattern(source).fullmatch(rest):
            values = {k: _translate(k, v, num_blocks, to_diffusers) for k, v in m.groupdict().items()}
            return f"{half}.{target.format(**values)}"
    return key


def _deprecated_to_current(key: str) -> str:
    m = re.fullmatch(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(\w+)", key)
    return f"{m[1]}{_DEPRECATED_ATTENTION[m[2]]}.{m[3]}" if m else key


def map_keys(keys: Iterable[str]) -> KeyMap:
    """Read a checkpoint's keys as diffusers AutoencoderKL keys; keys outside the VAE's prefix are left out."""
    keys = list(keys)
    prefix = detect_prefix(keys)
    inner = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and k[len(prefix):].startswith(HALVES)}
    layout, num_up = "diffusers", 0
    if is_wan(inner):
        top = tuple(f"{prefix}{name}." for name in _WAN_TOP)
        inner |= {k[len(prefix):]: k for k in keys if k.startswith(top)}
        group = _wan_group(inner)
        names = {_from_wan(k, group): src for k, src in inner.items()}
        return KeyMap(names=names, prefix=prefix, layout="wan", group=group)
    if is_ldm(inner):
        layout = "ldm"
        ups = [int(m[1]) for k in inner if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
        num_up = max(ups) + 1 if ups else 0
        inner = {_rename(k, num_up, to_diffusers=True): src for k, src in inner.items()}
        moved = {_swap(k, _INNER_QUANT): src for k, src in inner.items()}
        if moved.keys() != inner.keys():
            layout, inner = "bfl", moved
    renamed = {_deprecated_to_current(k): src for k, src in inner.items()}
    if renamed.keys() != inner.keys():
        layout += "+deprecated-attention"
    return KeyMap(names=renamed, prefix=prefix, layout=layout, num_up=num_up)


# Wan 2.1's original names (Wan `wan/modules/vae.py`; diffusers' `convert_wan_vae_to_diffusers`): a residual block's
# `residual` Sequential (0 norm, 2 conv, 3 norm, 6 conv) and `shortcut`; `head` (0 norm, 2 conv); `middle` (0 and 2
# residual blocks, 1 attention); flat `downsamples` / `upsamples`; the quant convs `conv1` / `conv2` at the top.
_WAN_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                 "shortcut": "conv_shortcut"}
_WAN_ENDS = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_WAN_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_WAN_BLOCK = re.compile(r"(encoder|decoder)\.(downsamples|upsamples|middle)\.(\d+)\.(.+)")
_DIFFUSERS_BLOCK = re.compile(r"(encoder|decoder)\.(down_blocks\.\d+|up_blocks\.\d+\.(?:resnets\.\d+|upsamplers\.0)"
                              r"|mid_block\.(?:resnets\.\d+|attentions\.0))\.(.+)")


def is_wan(keys: Iterable[str]) -> bool:
    """True for Wan 2.1's original names (`encoder.downsamples.0.residual.0.gamma`, `decoder.head.2.weight`...)."""
    pattern = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples|middle|head)\.")
    return any(pattern.match(k) for k in keys)


def _wan_group(keys: Iterable[str]) -> int:
    """Entries per up block in `decoder.upsamples`: up to and including the first upsampler."""
    firsts = [int(m[1]) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))]
    return min(firsts) + 1 if firsts else 0


def _swap(key: str, table: dict[str, str]) -> str:
    """`key` with the first of `table`'s names it starts with (whole name parts) replaced by its new name."""
    return next((new + key[len(old):] for old, new in table.items() if key.startswith(old + ".")), key)


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {new: old for old, new in table.items()}


def _from_wan(key: str, group: int) -> str:
    """The diffusers name of a Wan 2.1 key."""
    if (top := _swap(key, _WAN_TOP)) != key:
        return top
    m = _WAN_BLOCK.fullmatch(key)
    if not m:
        half, _, rest = key.partition(".")
        return f"{half}.{_swap(rest, _WAN_ENDS)}"
    half, kind, i, inner = m[1], m[2], int(m[3]), m[4]
    if kind == "middle" and i == 1:
        return f"{half}.mid_block.attentions.0.{inner}"
    if kind == "middle":
        where = f"mid_block.resnets.{i // 2}"
    elif kind == "downsamples":
        where = f"down_blocks.{i}"
    else:
        block, j = divmod(i, group) if group else (0, i)
        where = f"up_blocks.{block}.upsamplers.0" if j == group - 1 else f"up_blocks.{block}.resnets.{j}"
    return f"{half}.{where}.{_swap(inner, _WAN_RESIDUAL)}"


def wan_name(key: str, group: int) -> str:
    """The Wan 2.1 name of a diffusers key (the inverse of `_from_wan`), to name a tensor missing from such a file."""
    if (top := _swap(key, _inverse(_WAN_TOP))) != key:
        return top
    m = _DIFFUSERS_BLOCK.fullmatch(key)
    if not m:
        half, _, rest = key.partition(".")
        return f"{half}.{_swap(rest, _inverse(_WAN_ENDS))}"
    half, where, inner = m[1], m[2], m[3]
    numbers = [int(n) for n in re.findall(r"\d+", where)]
    if where.startswith("mid_block.attentions"):
        return f"{half}.middle.1.{inner}"
    if where.startswith("mid_block"):
        place = f"middle.{2 * numbers[0]}"
    elif where.startswith("down_blocks"):
        place = f"downsamples.{numbers[0]}"
    else:
        j = group - 1 if "upsamplers" in where else numbers[1]
        place = f"upsamples.{numbers[0] * group + j}"
    return f"{half}.{place}.{_swap(inner, _inverse(_WAN_RESIDUAL))}"


def fit_tensor(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A stored tensor in the shape the 2-D network holds it, where the file stores it another way: an LDM attention
    projection as a 1x1 conv; a Wan causal 3-D conv kernel (its last temporal slice: the conv's weights on the
    frame itself, two zero frames before it); a Wan RMS norm's `[C, 1, 1, 1]` gamma. Others come back as they are."""
    found = tuple(tensor.shape)
    if len(found) == len(shape) + 1 == 5 and found[:2] == shape[:2] and found[3:] == shape[2:]:
        return tensor[:, :, -1]
    if found != shape and found[:len(shape)] == shape and all(n == 1 for n in found[len(shape):]):
        return tensor.reshape(shape)
    return tensor


def ldm_name(key: str, num_blocks: int) -> str:
    """The CompVis/LDM name of a diffusers key (the inverse of `map_keys`' renaming), for writing LDM files."""
    return _rename(key, num_blocks, to_diffusers=False)


def to_ldm(state_dict: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in CompVis/LDM names, attention projections as 1x1 convs."""
    out = {}
    for key, tensor in state_dict.items():
        if _ATTENTION_WEIGHT.search(key):
            tensor = tensor[:, :, None, None]
        out[ldm_name(key, num_blocks)] = tensor
    return out
