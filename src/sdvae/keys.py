"""Every checkpoint layout's key names, mapped onto diffusers' AutoencoderKL names. The one place for renaming.

Layouts: diffusers (current and deprecated attention names), CompVis/LDM, each bare or under a `vae.` or
`first_stage_model.` prefix (whole pipeline or SD/SDXL checkpoints).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

PREFIXES = ("first_stage_model.", "vae.")
HALVES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LDM_RESNET = {"nin_shortcut": "conv_shortcut"}
# Attention projections that LDM files store as 1x1 convs `[C, C, 1, 1]`.
_ATTENTION_WEIGHT = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


@dataclass(frozen=True)
class KeyMap:
    """How a checkpoint's keys read as diffusers keys.

    `names` maps each diffusers key to the source key that holds it; `prefix` is the prefix that was stripped
    and `layout` is "diffusers" or "ldm" (with "+deprecated-attention" where those names were seen).
    """

    names: dict[str, str]
    prefix: str
    layout: str


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


def _ldm_to_diffusers(key: str, num_up_blocks: int) -> str:
    half, rest = key.split(".", 1)
    if half not in ("encoder", "decoder"):
        return key
    if m := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)", rest):
        kind, i, j, name, param = m.groups()
        block = int(i) if kind == "down" else num_up_blocks - 1 - int(i)
        rest = f"{kind}_blocks.{block}.resnets.{j}.{_LDM_RESNET.get(name, name)}.{param}"
    elif m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(\w+)", rest):
        rest = f"down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    elif m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(\w+)", rest):
        rest = f"up_blocks.{num_up_blocks - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    elif m := re.fullmatch(r"mid\.block_([12])\.(\w+)\.(\w+)", rest):
        rest = f"mid_block.resnets.{int(m[1]) - 1}.{_LDM_RESNET.get(m[2], m[2])}.{m[3]}"
    elif m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(\w+)", rest):
        rest = f"mid_block.attentions.0.{_LDM_ATTENTION.get(m[1], m[1])}.{m[2]}"
    elif m := re.fullmatch(r"norm_out\.(\w+)", rest):
        rest = f"conv_norm_out.{m[1]}"
    return f"{half}.{rest}"


def _deprecated_to_current(key: str) -> str:
    m = re.fullmatch(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(\w+)", key)
    return f"{m[1]}{_DEPRECATED_ATTENTION[m[2]]}.{m[3]}" if m else key


def map_keys(keys: Iterable[str]) -> KeyMap:
    """Read a checkpoint's keys as diffusers AutoencoderKL keys; keys outside the VAE's prefix are left out."""
    keys = list(keys)
    prefix = detect_prefix(keys)
    inner = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and k[len(prefix):].startswith(HALVES)}
    layout = "diffusers"
    if is_ldm(inner):
        layout = "ldm"
        ups = [int(m[1]) for k in inner if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
        num_up = max(ups) + 1 if ups else 0
        inner = {_ldm_to_diffusers(k, num_up): src for k, src in inner.items()}
    renamed = {_deprecated_to_current(k): src for k, src in inner.items()}
    if renamed.keys() != inner.keys():
        layout += "+deprecated-attention"
    return KeyMap(names=renamed, prefix=prefix, layout=layout)


def ldm_name(key: str, num_blocks: int) -> str:
    """The CompVis/LDM name of a diffusers key (the inverse of `map_keys`' renaming), for writing LDM files."""
    half, rest = key.split(".", 1)
    if half not in ("encoder", "decoder"):
        return key
    attention = {v: k for k, v in _LDM_ATTENTION.items()}
    resnet = {v: k for k, v in _LDM_RESNET.items()}
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", rest):
        kind, i, j, name, param = m.groups()
        block = int(i) if kind == "down" else num_blocks - 1 - int(i)
        rest = f"{kind}.{block}.block.{j}.{resnet.get(name, name)}.{param}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", rest):
        rest = f"down.{m[1]}.downsample.conv.{m[2]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", rest):
        rest = f"up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)\.(\w+)", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{resnet.get(m[2], m[2])}.{m[3]}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", rest):
        rest = f"mid.attn_1.{attention[m[1]]}.{m[2]}"
    elif m := re.fullmatch(r"conv_norm_out\.(\w+)", rest):
        rest = f"norm_out.{m[1]}"
    return f"{half}.{rest}"


def to_ldm(state_dict: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in CompVis/LDM names, attention projections as 1x1 convs."""
    out = {}
    for key, tensor in state_dict.items():
        if _ATTENTION_WEIGHT.search(key):
            tensor = tensor[:, :, None, None]
        out[ldm_name(key, num_blocks)] = tensor
    return out


def is_conv_shaped_attention(diffusers_key: str, shape: tuple[int, ...]) -> bool:
    """True for an attention projection stored as a 1x1 conv (`[C, C, 1, 1]`), as LDM files do."""
    return bool(_ATTENTION_WEIGHT.search(diffusers_key)) and len(shape) == 4 and shape[2:] == (1, 1)
