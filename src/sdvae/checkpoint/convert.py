"""Turn a checkpoint's tensors into one VAE half's weights: rename, check shapes and values, load, report what was
left."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..model.config import VaeConfig
from ..vae.base import VaeModule
from ..vae.decoder import VaeDecoder
from ..vae.encoder import VaeEncoder
from .keys import UNUSED, fit_tensor, map_keys


@dataclass(frozen=True)
class DropReport:
    """What loading did with a checkpoint's keys.

    `dropped` holds every source key this half did not use (the other half of the VAE, a UNet, text encoders...);
    `foreign` is the part of it that is not an AutoencoderKL key at all. `layout` and `prefix` say how the file was
    read, `loaded` how many tensors were taken from `source`.
    """

    source: str
    layout: str
    prefix: str
    loaded: int
    dropped: tuple[str, ...]
    foreign: tuple[str, ...]

    def summary(self) -> str:
        """One line: layout, tensors loaded, and the dropped keys counted by their first name component."""
        groups = Counter(k.removeprefix(self.prefix).split(".", 1)[0] for k in self.dropped)
        dropped = ", ".join(f"{name}.* x{n}" for name, n in groups.most_common()) or "nothing"
        prefix = f" under {self.prefix!r}" if self.prefix else ""
        return f"{self.layout} layout{prefix}: loaded {self.loaded} tensors, dropped {dropped}"


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    vae_keys: set[str],
    *,
    strict: bool = False,
    source: str = "state dict",
) -> tuple[dict[str, torch.Tensor], DropReport]:
    """Select and rename the tensors of one VAE half.

    `expected` is the half's own state-dict shapes; `vae_keys` every key of a whole AutoencoderKL of the same
    config. Only the tensors needed are read from `state_dict`, so a lazy mapping reads just those. Raises
    ValueError naming the keys when a tensor is missing, has the wrong shape or holds NaN or inf values, and in
    strict mode also when the source holds keys that are not part of the VAE.
    """
    keymap = map_keys(state_dict.keys())
    used = {keymap.names[k] for k in expected if k in keymap.names}
    dropped = [k for k in state_dict.keys() if k not in used]
    recognised = {src for name, src in keymap.names.items() if name in vae_keys or UNUSED.fullmatch(name)}
    foreign = [k for k in dropped if k not in recognised]
    out: dict[str, torch.Tensor] = {}
    missing, mismatched, not_finite = [], [], []
    for name, shape in expected.items():
        if name not in keymap.names:
            missing.append(keymap.source_key(name))
            continue
        src = keymap.names[name]
        tensor = state_dict[src]
        tensor = fit_tensor(tensor, tuple(shape))
        if tuple(tensor.shape) != tuple(shape):
            mismatched.append(f"{src}: expected {list(shape)}, found {list(tensor.shape)}")
        elif tensor.is_floating_point() and not (finite := torch.isfinite(tensor)).all():
            not_finite.append(f"{src} ({int((~finite).sum())} of {finite.numel()})")
        out[name] = tensor
    problems = []
    if mismatched:
        problems.append("shape mismatch (is the config right for these weights?): " + "; ".join(mismatched))
    if missing:
        where = f" under {keymap.prefix!r}" if keymap.prefix else ""
        problems.append(f"{len(missing)} tensor(s) missing (read as {keymap.layout} layout{where}): "
                        + ", ".join(missing))
    if not_finite:
        problems.append(f"{len(not_finite)} tensor(s) hold NaN or inf values (a damaged file, or weights that "
                        "diverged in training): " + ", ".join(not_finite))
    if strict and foreign:
        problems.append(f"strict loading found {len(foreign)} key(s) that are not part of the VAE: "
                        + ", ".join(foreign))
    if problems:
        raise ValueError(f"{source}: " + "\n  ".join(problems))
    report = DropReport(source=source, layout=keymap.layout, prefix=keymap.prefix, loaded=len(out),
                        dropped=tuple(dropped), foreign=tuple(foreign))
    return out, report


def whole_vae_keys(config: VaeConfig) -> set[str]:
    """Every state-dict key of a whole AutoencoderKL with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        return set(VaeEncoder(config).state_dict()) | set(VaeDecoder(config).state_dict())


def load_weights(module: VaeModule, state_dict: Mapping[str, torch.Tensor], strict: bool = False,
                 source: str = "state dict") -> DropReport:
    """Load a `VaeEncoder`'s or `VaeDecoder`'s weights from any supported layout (`sdvae.checkpoint.keys`);
    returns what was dropped.

    Raises ValueError naming the keys when a tensor of this half is missing, mis-shaped or not finite; `strict`
    also refuses keys that belong to no part of the VAE. The other half's keys are expected and only reported. A
    module built on the meta device takes copies of the tensors as its parameters (never views of a memory-mapped
    file), in its dtype, channels-last.
    """
    expected = {k: v.shape for k, v in module.state_dict().items()}
    tensors, report = convert_state_dict(state_dict, expected, whole_vae_keys(module.config), strict=strict,
                                         source=source)
    on_meta = any(p.is_meta for p in module.parameters())
    if on_meta:
        layout = {4: torch.channels_last}
        tensors = {k: v.to(dtype=module.dtype, memory_format=layout.get(v.ndim, torch.contiguous_format), copy=True)
                   for k, v in tensors.items()}
    module.load_state_dict(tensors, strict=True, assign=on_meta)
    module.to_channels_last()
    return report
