"""Test helpers: diffusers reference models with fresh random weights, and checkpoint writers for every layout.

The LDM writer below is written from the published CompVis names, independently of `sdvae.checkpoint.keys`; the tests
check it against diffusers' own LDM converter so that loading LDM files is not checked against itself.
"""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

from sdvae import VaeConfig, VaeDecoder, VaeEncoder, load_weights

# A small config for end-to-end tests: every block kind, 64 px samples, fast.
TINY = VaeConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against the reference `b`, computed in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


DIFFUSERS_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderKLFlux2": AutoencoderKLFlux2,
                     "AutoencoderKLQwenImage": AutoencoderKLQwenImage}


def reference_vae(config: VaeConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The diffusers VAE of this config (AutoencoderKL, AutoencoderKLFlux2 or AutoencoderKLQwenImage) with fresh
    random weights: norm affines (GroupNorm weights, RMS norm gammas), biases and FLUX.2's bn statistics included."""
    settings = config.to_diffusers()
    torch.manual_seed(seed)
    vae = DIFFUSERS_CLASSES[settings["_class_name"]](**{k: v for k, v in settings.items() if not k.startswith("_")})
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ("norm" in name and name.endswith("weight")) or name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        if settings["_class_name"] == "AutoencoderKLFlux2":
            vae.bn.running_mean.normal_()
            vae.bn.running_var.uniform_(0.3, 3.0)
    return vae.to(dtype).eval()


def loaded_from(ref: AutoencoderKL, config: VaeConfig,
                dtype: torch.dtype = torch.float32) -> tuple[VaeEncoder, VaeDecoder]:
    """Our encoder and decoder holding `ref`'s weights (strict: every key is one of ours), built on the meta device:
    no random weights of our own to draw, which for the widest configs took seconds."""
    with torch.device("meta"):
        enc, dec = VaeEncoder(config).to(dtype), VaeDecoder(config).to(dtype)
    state = ref.state_dict()
    for module in (enc, dec):
        module.load_report = load_weights(module, state, strict=True)
    return enc.eval(), dec.eval()


def random_images(batch: int, height: int, width: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, height, width, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


_LDM_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to CompVis/LDM names; attention weights as 1x1 convs."""
    out = {}
    for key, t in state.items():
        k = key
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"up.{num_blocks - 1 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"up.{num_blocks - 1 - int(m[1])}.upsample", k)
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        m = re.search(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", k)
        if m:
            k = k.replace(m[0], f"mid.attn_1.{_LDM_ATTN[m[1]]}.")
            if k.endswith("weight") and m[1] != "group_norm":
                t = t[:, :, None, None]
        out[k] = t
    return out


def diffusers_to_deprecated_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attention names diffusers used before 0.14 (still shipped by the original SD 1.5 repo)."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, t in state.items():
        m = re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", key)
        out[key.replace(m[0], f"attentions.0.{names[m[1]]}.") if m else key] = t
    return out


def unet_and_text_tensors(family: str) -> dict[str, torch.Tensor]:
    """A few small tensors with the names that sit beside the VAE in whole SD-family checkpoints."""
    common = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "model.diffusion_model.out.2.bias": torch.randn(4),
    }
    text = {
        "sd15": {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(10, 8)},
        "sd2": {"cond_stage_model.model.token_embedding.weight": torch.randn(10, 8)},
        "sdxl": {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.randn(8),
                 "conditioner.embedders.1.model.ln_final.weight": torch.randn(8)},
        "sd3": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.randn(6, 2),
                "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.randn(8)},
        "flux": {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.randn(6, 2)},
    }[family]
    return {**common, **text}
