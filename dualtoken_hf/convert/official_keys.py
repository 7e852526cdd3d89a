# Copyright 2025 The DualToken HF authors. Licensed under the Apache License, Version 2.0.
"""Renaming of official DualToken state-dict entries to this package's module names.

Pure functions on `{name: tensor}` dicts: nothing is built and no tensor is copied (except 1×1 conv weights of the
decoder attention, which are reshaped to Linear weights as diffusers' `Attention` expects). The official names
are those of `RQVAESiglipModel.state_dict()` (no `module.` prefix); see the reference README §4 and the full-size
key listings.

Mapping summary (official → ours):

- projections, `attention` (v2 `AttnProjection`): same names; the all-zero `attn.zero_k_bias` buffer is dropped.
- projections, `resconv` (v1 ResNet block): `nin_shortcut` → `conv_shortcut`, the rest unchanged.
- decoder (relative to [`DualTokenPixelDecoder`]):
  - `postquant_pix.*` (v2) / `postquant_visual.*` (v1) → `post_projection.*` (rules above)
  - `post_quant_conv.*` → `post_quant_conv.*` (`nin_shortcut` → `conv_shortcut`)
  - `decoder.conv_in`, `decoder.conv_out` → unchanged; `decoder.norm_out` → `decoder.conv_norm_out`
  - `decoder.mid.block_{1,2}` → `decoder.mid_block.resnets.{0,1}`
  - `decoder.mid.attn_1` → `decoder.mid_block.attentions.0`
  - `decoder.up.{i}` → `decoder.up_blocks.{num_levels - 1 - i}` (official `up.0` is the highest resolution,
    diffusers `up_blocks.0` the lowest); inside: `block.{j}` → `resnets.{j}`, `attn.{j}` → `attentions.{j}`,
    `upsample.conv` → `upsamplers.0.conv`
  - attention blocks: `norm` → `group_norm`, `q/k/v` → `to_q/to_k/to_v`, `proj_out` → `to_out.0`, weights
    squeezed from `(C, C, 1, 1)` to `(C, C)`.
"""

import re
from collections.abc import Mapping

import torch


__all__ = ["convert_official_decoder", "convert_official_projection"]

_ATTENTION_PROJECTION_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "norm3.weight",
    "norm3.bias",
    "proj.weight",
    "proj.bias",
    "attn.qkv.weight",
    "attn.q_bias",
    "attn.v_bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "mlp.norm.weight",
    "mlp.norm.bias",
    "mlp.w0.weight",
    "mlp.w0.bias",
    "mlp.w1.weight",
    "mlp.w1.bias",
    "mlp.w2.weight",
    "mlp.w2.bias",
)
_ATTENTION_PROJECTION_DROPPED = ("attn.zero_k_bias",)
_RESNET_KEYS = tuple(f"{layer}.{p}" for layer in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias"))
_SHORTCUT_KEYS = ("nin_shortcut.weight", "nin_shortcut.bias")
_ATTN_BLOCK_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BLOCK_KEYS = tuple(f"{layer}.{p}" for layer in _ATTN_BLOCK_NAMES for p in ("weight", "bias"))
_POST_PROJECTION = {"v1": ("postquant_visual", "resconv"), "v2": ("postquant_pix", "attention")}


def _normalize_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _raise_missing(missing: list[str]) -> None:
    if missing:
        raise KeyError(f"{len(missing)} official key(s) missing from the state dict: {sorted(missing)}")


def _raise_unexpected(unexpected: list[str]) -> None:
    if unexpected:
        raise KeyError(f"{len(unexpected)} official key(s) have no counterpart here: {sorted(unexpected)}")


def _resnet_keys(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """Expected official keys of one ResNet block (the shortcut only when its conv1 changes the width)."""
    keys = [prefix + k for k in _RESNET_KEYS]
    conv1 = state_dict.get(prefix + "conv1.weight")
    if conv1 is not None and conv1.shape[0] != conv1.shape[1]:
        keys += [prefix + k for k in _SHORTCUT_KEYS]
    return keys


def _rename_resnet(name: str) -> str:
    return name.replace("nin_shortcut.", "conv_shortcut.")


def convert_official_projection(
    state_dict: Mapping[str, torch.Tensor], official_prefix: str, projection_type: str
) -> dict[str, torch.Tensor]:
    r"""
    Renames one official projection's entries to the names of [`build_projection`]'s module.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): Official state dict (may hold any other keys too).
        official_prefix (`str`): The projection's official name, e.g. `"prequant_pix"` or `"postquant_visual"`
            (a trailing dot is optional).
        projection_type (`str`): `"attention"` (v2) or `"resconv"` (v1).

    Returns:
        `dict[str, torch.Tensor]` with keys relative to the projection module (no prefix).

    Raises:
        `KeyError`: if an expected official key is absent, or a key under the prefix has no counterpart.
    """
    prefix = _normalize_prefix(official_prefix)
    present = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if projection_type == "attention":
        expected = list(_ATTENTION_PROJECTION_KEYS)
        dropped = set(_ATTENTION_PROJECTION_DROPPED)
        rename = lambda name: name  # noqa: E731
    elif projection_type == "resconv":
        expected = _resnet_keys(present, "")
        dropped = set()
        rename = _rename_resnet
    else:
        raise ValueError(f"projection_type must be 'attention' or 'resconv', got {projection_type!r}")

    _raise_missing([prefix + k for k in expected if k not in present])
    _raise_unexpected([prefix + k for k in present if k not in expected and k not in dropped])
    return {rename(k): present[k] for k in expected}


def _official_decoder_keys(
    state_dict: Mapping[str, torch.Tensor], num_levels: int, layers_per_block: int
) -> list[str]:
    """Every official `decoder.*` key the conv decoder needs, given what the state dict says about attention."""
    keys = ["decoder.conv_in.weight", "decoder.conv_in.bias"]
    keys += _resnet_keys(state_dict, "decoder.mid.block_1.")
    keys += [f"decoder.mid.attn_1.{k}" for k in _ATTN_BLOCK_KEYS]
    keys += _resnet_keys(state_dict, "decoder.mid.block_2.")
    for level in range(num_levels):
        up = f"decoder.up.{level}."
        has_attention = any(k.startswith(up + "attn.") for k in state_dict)
        for j in range(layers_per_block + 1):
            keys += _resnet_keys(state_dict, f"{up}block.{j}.")
            if has_attention:
                keys += [f"{up}attn.{j}.{k}" for k in _ATTN_BLOCK_KEYS]
        if level != 0:
            keys += [up + "upsample.conv.weight", up + "upsample.conv.bias"]
    keys += ["decoder.norm_out.weight", "decoder.norm_out.bias", "decoder.conv_out.weight", "decoder.conv_out.bias"]
    return keys


def _rename_decoder_key(name: str, num_levels: int) -> str:
    """`decoder.*` official name → diffusers `Decoder` name (both with the leading `decoder.`)."""
    name = _rename_resnet(name)
    name = re.sub(r"^decoder\.mid\.block_(\d)\.", lambda m: f"decoder.mid_block.resnets.{int(m[1]) - 1}.", name)
    name = name.replace("decoder.mid.attn_1.", "decoder.mid_block.attentions.0.")
    name = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.", name)
    name = re.sub(r"(up_blocks\.\d+\.)block\.", r"\1resnets.", name)
    name = re.sub(r"(up_blocks\.\d+\.)attn\.", r"\1attentions.", name)
    name = name.replace(".upsample.conv.", ".upsamplers.0.conv.")
    name = name.replace("decoder.norm_out.", "decoder.conv_norm_out.")
    match = re.match(r"^(.*\.attentions\.\d+\.)(norm|q|k|v|proj_out)\.(weight|bias)$", name)
    if match:
        name = f"{match[1]}{_ATTN_BLOCK_NAMES[match[2]]}.{match[3]}"
    return name


def convert_official_decoder(
    state_dict: Mapping[str, torch.Tensor], version: str, num_levels: int, layers_per_block: int
) -> dict[str, torch.Tensor]:
    r"""
    Collects and renames the official pixel-decoder entries into a [`DualTokenPixelDecoder`] state dict.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): Official `RQVAESiglipModel` state dict (other keys are ignored).
        version (`str`): `"v1"` (paper release, conv `postquant_visual`) or `"v2"` (attention `postquant_pix`).
        num_levels (`int`): Number of decoder resolutions, `len(ch_mult)`.
        layers_per_block (`int`): The official `num_res_blocks` (each level holds `num_res_blocks + 1` blocks).

    Returns:
        `dict[str, torch.Tensor]` whose keys are exactly those of `DualTokenPixelDecoder.state_dict()`.

    Raises:
        `KeyError`: listing the expected official keys that are absent, or official decoder keys left unmapped.
    """
    if version not in _POST_PROJECTION:
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    projection_prefix, projection_type = _POST_PROJECTION[version]
    converted = {
        f"post_projection.{k}": v
        for k, v in convert_official_projection(state_dict, projection_prefix, projection_type).items()
    }

    post_quant_conv = {
        k[len("post_quant_conv.") :]: v for k, v in state_dict.items() if k.startswith("post_quant_conv.")
    }
    expected_post = _resnet_keys(post_quant_conv, "")
    decoder_keys = _official_decoder_keys(state_dict, num_levels, layers_per_block)
    _raise_missing(
        [f"post_quant_conv.{k}" for k in expected_post if k not in post_quant_conv]
        + [k for k in decoder_keys if k not in state_dict]
    )
    expected_decoder = set(decoder_keys)
    _raise_unexpected(
        [f"post_quant_conv.{k}" for k in post_quant_conv if k not in expected_post]
        + [k for k in state_dict if k.startswith("decoder.") and k not in expected_decoder]
    )

    for k in expected_post:
        converted[f"post_quant_conv.{_rename_resnet(k)}"] = post_quant_conv[k]
    for k in decoder_keys:
        tensor = state_dict[k]
        if ".attn" in k and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # 1×1 conv → Linear
        converted[_rename_decoder_key(k, num_levels)] = tensor
    return converted
