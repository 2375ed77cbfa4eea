"""`VaeConfig`: one dataclass for both halves of an AutoencoderKL (and FLUX.2's AutoencoderKLFlux2, the same network
with its latents' statistics), with diffusers' field names."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys diffusers writes into an AutoencoderKL config.json that carry no architecture (bookkeeping).
_BOOKKEEPING_PREFIX = "_"
_SUPPORTED_VALUES = {
    "down_block_types": "DownEncoderBlock2D",
    "up_block_types": "UpDecoderBlock2D",
    "act_fn": "silu",
}
# diffusers' class for each kind of config: FLUX.2's has patch_size (its latents are patchified and normalized).
CLASS_NAMES = ("AutoencoderKL", "AutoencoderKLFlux2")
_TRAINING_ONLY = ("batch_norm_momentum",)  # FLUX.2's BatchNorm update rate: no effect on inference
_FLUX2_ONLY = frozenset({"decoder_block_out_channels", "patch_size", "batch_norm_eps"})
_SDVAE_ONLY = frozenset({"family", "network", "temperal_downsample"})
# The Wan 2.1 network (Qwen-Image's VAE is the same): its diffusers classes, and the settings that do not change one
# frame's result (dropout: inference; the temporal scale: frames only).
WAN_CLASSES = ("AutoencoderKLQwenImage", "AutoencoderKLWan")
_WAN_IGNORED = {"dropout": None, "scale_factor_temporal": None, "scale_factor_spatial": 8, "decoder_base_dim": None,
                "is_residual": False, "patch_size": None, "attn_scales": []}
_KL_ONLY = frozenset({"scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast"})


@dataclass(frozen=True)
class VaeConfig:
    """Architecture and latent scaling of a Stable-Diffusion-family VAE (diffusers `AutoencoderKL` config).

    FLUX.2 (`AutoencoderKLFlux2`) adds `patch_size` (its latents are patchified, then normalized by the statistics
    of the `bn` buffers, `batch_norm_eps`) and `decoder_block_out_channels` (a decoder narrower than the encoder).
    `network="wan"` is the Wan 2.1 / Qwen-Image VAE for one frame (`sdvae.model.wan`): `block_out_channels` are
    base_dim times dim_mult, `layers_per_block` num_res_blocks, `latent_channels` z_dim; `temperal_downsample` is
    kept for its config only (one frame never runs the temporal convs), `norm_num_groups` is unused (RMS norms).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    sample_size: int = 512
    decoder_block_out_channels: tuple[int, ...] | None = None
    patch_size: tuple[int, int] | None = None
    batch_norm_eps: float = 1e-4
    network: str = "autoencoder_kl"
    temperal_downsample: tuple[bool, ...] | None = None
    family: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "decoder_block_out_channels", "patch_size", "temperal_downsample"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if isinstance(self.sample_size, (list, tuple)):
            object.__setattr__(self, "sample_size", int(self.sample_size[0]))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot build a working VAE."""
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VaeConfig.{name} must be a positive int, got {value!r}")
        boc = self.block_out_channels
        if not boc or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in boc):
            raise ValueError(f"VaeConfig.block_out_channels must be a non-empty tuple of positive ints, got {boc!r}")
        dboc = self.decoder_block_out_channels
        if dboc is not None and (len(dboc) != len(boc) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in dboc)):
            raise ValueError(f"VaeConfig.decoder_block_out_channels must be None or {len(boc)} positive ints (one per "
                             f"encoder block), got {dboc!r}")
        for c in (*boc, *(dboc or ())):
            if c % self.norm_num_groups:
                raise ValueError(
                    f"VaeConfig.block_out_channels entry {c} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
        if not isinstance(self.scaling_factor, (int, float)) or isinstance(self.scaling_factor, bool) \
                or self.scaling_factor == 0:
            raise ValueError(f"VaeConfig.scaling_factor must be a non-zero number, got {self.scaling_factor!r}")
        if self.shift_factor is not None and not isinstance(self.shift_factor, (int, float)):
            raise ValueError(f"VaeConfig.shift_factor must be a number or None, got {self.shift_factor!r}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("VaeConfig.latents_mean and latents_std must be given together")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.latent_channels:
                raise ValueError(
                    f"VaeConfig.{name} has {len(value)} entries, expected latent_channels={self.latent_channels}"
                )
        if self.latents_std is not None and any(s == 0 for s in self.latents_std):
            raise ValueError(f"VaeConfig.latents_std must not contain zeros, got {self.latents_std!r}")
        ps = self.patch_size
        if ps is not None and (not isinstance(ps, tuple) or len(ps) != 2 or ps[0] != ps[1]
                               or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in ps)):
            raise ValueError(f"VaeConfig.patch_size must be None or a square (p, p) of positive ints, got {ps!r}")
        if not isinstance(self.batch_norm_eps, (int, float)) or isinstance(self.batch_norm_eps, bool) \
                or self.batch_norm_eps < 0:
            raise ValueError(f"VaeConfig.batch_norm_eps must be a number >= 0, got {self.batch_norm_eps!r}")
        if self.network not in ("autoencoder_kl", "wan"):
            raise ValueError(f"VaeConfig.network must be 'autoencoder_kl' or 'wan', got {self.network!r}")
        if self.network == "wan" and (any(c % boc[0] for c in boc) or self.patch_size or dboc):
            raise ValueError(f"VaeConfig: a Wan network has widths base_dim * dim_mult (multiples of the first) and no "
                             f"patch_size or decoder widths of its own, got {boc!r}")
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VaeConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each axis (8 for every known family)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """The decoder's block widths, in the encoder's order (deepest last)."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def uses_mean(self) -> bool:
        """Whether the family's pipelines and training scripts feed the transformer the mean, not a sample (FLUX.2)."""
        return self.patch_size is not None

    @property
    def latent_multiple(self) -> int:
        """Pixels that image sides must be a multiple of for the scaled latents (16 for FLUX.2's 2x2 patches)."""
        return self.downsample_factor * (self.patch_size[0] if self.patch_size else 1)

    def replace(self, **changes: Any) -> VaeConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> VaeConfig:
        """The config of a known family: one of `PRESETS` (sd15, sd2, sdxl, sd3, flux, flux2, playground, cogview,
        qwenimage)."""
        try:
            return PRESETS[name.lower()]
        except KeyError:
            raise ValueError(f"unknown VAE family {name!r}; known: {', '.join(PRESETS)}") from None

    @classmethod
    def from_diffusers(cls, source: dict[str, Any] | str | Path) -> VaeConfig:
        """Build from a diffusers AutoencoderKL or AutoencoderKLFlux2 `config.json` (a dict, the file, or its
        folder)."""
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            try:
                source = json.loads(path.read_text())
            except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
                hint = f" (for the {source} preset, pass family={str(source)!r})" if str(source) in PRESETS else ""
                raise ValueError(f"{path}: cannot read a diffusers config{hint}: {e}") from e
            if not isinstance(source, dict):
                raise ValueError(f"{path}: a diffusers config must be a JSON object")
        class_name = source.get("_class_name", CLASS_NAMES["patch_size" in source])  # (a dict of a model's config)
        if class_name in WAN_CLASSES:
            return _from_wan(source, class_name)
        if class_name not in CLASS_NAMES:
            raise ValueError(f"config _class_name={class_name!r}: sdvae implements "
                             f"{', '.join(CLASS_NAMES + WAN_CLASSES)} only")
        flux2 = class_name == "AutoencoderKLFlux2"
        known = {f.name for f in dataclasses.fields(cls)} - _SDVAE_ONLY - (_KL_ONLY if flux2 else _FLUX2_ONLY)
        kwargs: dict[str, Any] = {}
        for key, value in source.items():
            if key.startswith(_BOOKKEEPING_PREFIX) or (flux2 and key in _TRAINING_ONLY):
                continue
            if key in _SUPPORTED_VALUES:
                wanted = _SUPPORTED_VALUES[key]
                values = value if isinstance(value, (list, tuple)) else [value]
                if any(v != wanted for v in values):
                    raise ValueError(f"config {key}={value!r} is not supported; sdvae implements {wanted!r} only")
                continue
            if key not in known:
                raise ValueError(f"config key {key!r} (= {value!r}) is not an {class_name} setting sdvae knows")
            kwargs[key] = value
        for key in ("down_block_types", "up_block_types"):
            blocks = source.get(key)
            n = len(kwargs.get("block_out_channels", cls.block_out_channels))
            if blocks is not None and len(blocks) != n:
                raise ValueError(f"config {key} has {len(blocks)} entries but block_out_channels has {n}")
        return PRESETS["flux2"].replace(**kwargs) if flux2 else cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `config.json` dict for this config (AutoencoderKLQwenImage's for the Wan network)."""
        if self.network == "wan":
            return _to_wan(self)
        other = (_KL_ONLY if self.patch_size is not None else _FLUX2_ONLY) | _SDVAE_ONLY
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in other}
        n = len(self.block_out_channels)
        out.update(
            _class_name=CLASS_NAMES[self.patch_size is not None],
            act_fn="silu",
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=list(self.block_out_channels),
        )
        for key in ("latents_mean", "latents_std", "decoder_block_out_channels", "patch_size"):
            if out.get(key) is not None:
                out[key] = list(out[key])
        return out


def _from_wan(source: dict[str, Any], class_name: str) -> VaeConfig:
    """A Wan 2.1 / Qwen-Image config (diffusers AutoencoderKLQwenImage or AutoencoderKLWan) as a VaeConfig."""
    kwargs: dict[str, Any] = {}
    settings = {k: v for k, v in source.items() if not k.startswith(_BOOKKEEPING_PREFIX)}
    for key, value in settings.items():
        if key in _WAN_IGNORED:
            if _WAN_IGNORED[key] is not None and value not in (_WAN_IGNORED[key], None):
                raise ValueError(f"config {key}={value!r}: not the Wan 2.1 / Qwen-Image VAE (Wan 2.2's VAE is another "
                                 f"network); sdvae implements {key}={_WAN_IGNORED[key]!r} only")
        elif key not in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "input_channels",
                         "in_channels", "out_channels", "latents_mean", "latents_std"):
            raise ValueError(f"config key {key!r} (= {value!r}) is not an {class_name} setting sdvae knows")
    if settings.get("decoder_base_dim") not in (None, settings.get("base_dim", 96)):
        raise ValueError(f"config decoder_base_dim={settings['decoder_base_dim']!r}: sdvae implements a decoder as "
                         "wide as the encoder only")
    base, mult = settings.get("base_dim", 96), settings.get("dim_mult", [1, 2, 4, 4])
    kwargs["block_out_channels"] = tuple(base * m for m in mult)
    if "num_res_blocks" in settings:
        kwargs["layers_per_block"] = settings["num_res_blocks"]
    if "z_dim" in settings:
        kwargs["latent_channels"] = settings["z_dim"]
    for key, field_name in (("input_channels", "in_channels"), ("in_channels", "in_channels"),
                            ("input_channels", "out_channels"), ("out_channels", "out_channels"),
                            ("latents_mean", "latents_mean"), ("latents_std", "latents_std"),
                            ("temperal_downsample", "temperal_downsample")):
        if key in settings:
            kwargs[field_name] = settings[key]
    return PRESETS["qwenimage"].replace(**kwargs)


def _to_wan(config: VaeConfig) -> dict[str, Any]:
    base = config.block_out_channels[0]
    return {
        "_class_name": "AutoencoderKLQwenImage", "base_dim": base, "z_dim": config.latent_channels,
        "dim_mult": [c // base for c in config.block_out_channels], "num_res_blocks": config.layers_per_block,
        "attn_scales": [], "temperal_downsample": list(config.temperal_downsample or [False, True, True][
            :len(config.block_out_channels) - 1]),
        "dropout": 0.0, "input_channels": config.in_channels,
        "latents_mean": list(config.latents_mean or ()), "latents_std": list(config.latents_std or ()),
    }


PRESETS: dict[str, VaeConfig] = {
    "sd15": VaeConfig(family="sd15"),
    "sd2": VaeConfig(sample_size=768, family="sd2"),
    "sdxl": VaeConfig(scaling_factor=0.13025, sample_size=1024, family="sdxl"),
    "sd3": VaeConfig(
        latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False, sample_size=1024, family="sd3",
    ),
    "flux": VaeConfig(
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, sample_size=1024, family="flux",
    ),
    "flux2": VaeConfig(
        latent_channels=32, scaling_factor=1.0, patch_size=(2, 2), batch_norm_eps=1e-4, sample_size=1024,
        family="flux2",
    ),
    "qwenimage": VaeConfig(
        latent_channels=16, block_out_channels=(96, 192, 384, 384), layers_per_block=2, norm_num_groups=1,
        scaling_factor=1.0, latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                          0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
        latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                     1.6382, 1.1253, 2.8251, 1.9160),
        sample_size=1024, network="wan", temperal_downsample=(False, True, True), family="qwenimage",
    ),
    "playground": VaeConfig(
        scaling_factor=0.5, latents_mean=(-1.6574, 1.886, -1.383, 2.5155),
        latents_std=(8.4927, 5.9022, 6.5498, 5.2299), sample_size=1024, family="playground",
    ),
    "cogview": VaeConfig(
        latent_channels=16, block_out_channels=(128, 512, 1024, 1024), layers_per_block=3,
        scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, sample_size=1024, family="cogview",
    ),
}
