# Copyright 2025 The DualToken authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Configuration of the DualToken vision tokenizer.

The class defaults describe the paper's tokenizer (the official 2025 release): SigLIP so400m-patch14-384, pixel
codes from block 6 and semantic codes from block 26 of 27, conv ResNet-block projections 1152 <-> 256 and
one 32768 x 256 codebook per branch shared by D = 8 residual depths. `from_preset` gives the later official
layout (`"v2"`) and a tiny one for tests and demos.
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import auto_docstring


SIGLIP_SO400M_PATCH14_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": True,
}

QUANTIZER_DEFAULTS = {
    "codebook_size": 32768,
    "code_dim": 256,
    "depth": 8,
    "shared_codebook": True,
    "ema_decay": 0.99,
    "eps": 1e-5,
    "restart_dead_codes": True,
    "restart_threshold": 1.0,
    "ema_update_per_depth": True,
    "ema_sum_clamp": 1000.0,
    "official_ema_quirk": False,
}

DECODER_DEFAULTS = {
    "decoder_in_channels": 1024,
    "block_out_channels": [128, 128, 512, 512, 1024],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
}

PROJECTION_TYPES = ("resconv", "attention")

_V2_QUANTIZER = {"codebook_size": 16384, "code_dim": 32, "ema_sum_clamp": None}

PRESETS = {
    "paper": {},
    "v2": {
        "projection_type": "attention",
        "shortcut_layer": 4,
        "pixel_quantizer_config": _V2_QUANTIZER,
        "semantic_quantizer_config": {**_V2_QUANTIZER, "ema_update_per_depth": False},
    },
    "tiny": {
        "siglip_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        "pixel_layer": 2,
        "semantic_layer": 5,
        "shortcut_layer": 1,
        "projection_type": "attention",
        "pixel_quantizer_config": {"codebook_size": 256, "code_dim": 16, "depth": 4, "ema_sum_clamp": None},
        "semantic_quantizer_config": {
            "codebook_size": 256,
            "code_dim": 16,
            "depth": 4,
            "ema_sum_clamp": None,
            "ema_update_per_depth": False,
        },
        "decoder_config": {"decoder_in_channels": 64, "block_out_channels": [32, 32, 64, 64]},
    },
}


def merge_settings(preset: dict, overrides: dict) -> dict:
    """A copy of `preset` with `overrides` applied; dict-valued settings are merged key by key."""
    settings = copy.deepcopy(preset)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


@auto_docstring(
    custom_intro="""
    Configuration of [`DualTokenVisionModel`], the dual-codebook vision tokenizer of DualToken (paper §3.2). The
    defaults describe the paper's tokenizer; [`~DualTokenVisionConfig.from_preset`] gives the others.
    """
)
@strict
class DualTokenVisionConfig(PreTrainedConfig):
    r"""
    siglip_config (`dict` or `SiglipVisionConfig`, *optional*):
        The SigLIP vision tower. Defaults to SigLIP so400m-patch14-384.
    pixel_layer (`int`, *optional*, defaults to 6):
        1-indexed encoder block whose output feeds the pixel branch (shallow features, reconstruction).
    semantic_layer (`int`, *optional*, defaults to 26):
        1-indexed encoder block whose output feeds the semantic branch (deep, text-aligned features).
    shortcut_layer (`int`, *optional*):
        1-indexed block whose projected output is added to the pixel latents (official v2: block 4).
    shortcut_weight (`float`, *optional*, defaults to 0.6):
        Weight of the shortcut latents in the pixel latents.
    projection_type (`str`, *optional*, defaults to `"resconv"`):
        `"resconv"` (paper: conv ResNet blocks) or `"attention"` (v2: attention projections) between the
        SigLIP width and the code width.
    causal_up_projection (`bool`, *optional*, defaults to `True`):
        Whether attention up-projections (codes -> SigLIP width) attend causally in raster order, as the
        official v2 does. Ignored by `"resconv"`.
    semantic_feedback (`bool`, *optional*, defaults to `True`):
        Run the blocks after `semantic_layer`, the post-layernorm and the pooling head on the quantized
        semantic latents projected back to the SigLIP width (both official versions do). When `False`,
        `encode` stops at the semantic layer and pools its unquantized output.
    pixel_quantizer_config (`dict`, *optional*):
        Keyword arguments of the pixel [`DualTokenResidualQuantizer`]; missing keys take the paper values.
    semantic_quantizer_config (`dict`, *optional*):
        The same for the semantic quantizer.
    decoder_config (`dict`, *optional*):
        Settings of the [`DualTokenPixelDecoder`] that do not follow from the tower (channels, blocks);
        missing keys take the paper values.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the normal initialiser of the projections.

    Example:

    ```python
    >>> from dualtoken_hf import DualTokenVisionConfig, DualTokenVisionModel

    >>> config = DualTokenVisionConfig.from_preset("tiny")
    >>> model = DualTokenVisionModel(config)
    ```"""

    model_type = "dualtoken_vision"
    sub_configs_defaults = {
        "siglip_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=SIGLIP_SO400M_PATCH14_384)
    }

    siglip_config: dict | PreTrainedConfig | None = None
    pixel_layer: int = 6
    semantic_layer: int = 26
    shortcut_layer: int | None = None
    shortcut_weight: float | int = 0.6
    projection_type: str = "resconv"
    causal_up_projection: bool = True
    semantic_feedback: bool = True
    pixel_quantizer_config: dict | None = None
    semantic_quantizer_config: dict | None = None
    decoder_config: dict | None = None
    initializer_range: float | int = 0.02

    def __post_init__(self, **kwargs):
        self.pixel_quantizer_config = {**QUANTIZER_DEFAULTS, **(self.pixel_quantizer_config or {})}
        self.semantic_quantizer_config = {**QUANTIZER_DEFAULTS, **(self.semantic_quantizer_config or {})}
        self.decoder_config = {**DECODER_DEFAULTS, **(self.decoder_config or {})}
        super().__post_init__(**kwargs)
        # Reject an impossible layout here, with the plain `ValueError`: `@strict` runs the same check right after
        # `__init__` but would wrap it in `StrictDataclassClassValidationError`, which is not a `ValueError`.
        self.validate_architecture()

    def validate_architecture(self):
        """Check that the layer taps and widths describe a model that can be built."""
        num_layers = self.siglip_config.num_hidden_layers
        if self.projection_type not in PROJECTION_TYPES:
            raise ValueError(f"projection_type must be one of {PROJECTION_TYPES}, got {self.projection_type!r}")
        if not 1 <= self.pixel_layer <= self.semantic_layer <= num_layers:
            raise ValueError(
                f"need 1 <= pixel_layer <= semantic_layer <= num_hidden_layers ({num_layers}), "
                f"got pixel_layer={self.pixel_layer}, semantic_layer={self.semantic_layer}"
            )
        if self.shortcut_layer is not None and not 1 <= self.shortcut_layer <= self.semantic_layer:
            raise ValueError(
                f"shortcut_layer must be in [1, semantic_layer={self.semantic_layer}], got {self.shortcut_layer}"
            )

    @property
    def image_size(self) -> int:
        return self.siglip_config.image_size

    @property
    def grid_size(self) -> int:
        """Positions per side of the code grid (27 for the 384 px presets: the patch conv drops the remainder)."""
        return self.siglip_config.image_size // self.siglip_config.patch_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DualTokenVisionConfig":
        """Build a preset: `"paper"` (2025 release), `"v2"` (later official code) or `"tiny"` (tests, demos).

        Keyword overrides are applied on top; dict-valued settings are merged key by key.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        settings = merge_settings(PRESETS[name], overrides)
        if isinstance(settings.get("siglip_config"), dict):
            settings["siglip_config"] = {**SIGLIP_SO400M_PATCH14_384, **settings["siglip_config"]}
        return cls(**settings)


QWEN2_5_3B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}

DEPTH_HEAD_DEFAULTS = {
    "num_layers": 3,
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}

UNIFIED_PRESETS = {
    "dualtoken-3b": {},
    "tiny": {
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        },
        "vision_preset": "tiny",
        "depth_head_config": {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128},
        "pad_token_id": 508,
        "image_token_id": 509,
        "boi_token_id": 510,
        "eoi_token_id": 511,
    },
}


@auto_docstring(
    custom_intro="""
    Configuration of [`DualTokenForConditionalGeneration`], the unified MLLM of DualToken (paper §3.3, Fig. 3c).

    The defaults describe the paper's model: Qwen2.5-3B reading and writing images through the paper tokenizer
    (27 x 27 positions x 8 residual depths per branch at 384 px).
    """
)
@strict
class DualTokenConfig(PreTrainedConfig):
    r"""
    text_config (`dict` or `PreTrainedConfig`, *optional*):
        Any causal-LM config (`model_type` selects the architecture; Qwen2 by default, Llama works too).
    vision_config (`dict` or [`DualTokenVisionConfig`], *optional*):
        The vision tokenizer. Defaults to the paper preset.
    depth_head_config (`dict`, *optional*):
        The two depth-transformer heads (eq. 5): `num_layers` (3), `hidden_size`, `num_attention_heads`,
        `intermediate_size`, `hidden_act`, `layer_norm_eps`. The number of slots and the classifier sizes follow
        from each branch's quantizer (depth D, codebook size K): one classifier per depth.
    projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
        Activation of the 2-layer MLP that maps concat(pixel, semantic code embeddings) to the LLM width.
    freeze_vision_tokenizer (`bool`, *optional*, defaults to `True`):
        Keep the tokenizer frozen (no gradients, eval mode, no codebook updates), as in the paper.
    image_token_id (`int`, *optional*, defaults to 151665):
        Id of the image placeholder token, one per grid position.
    boi_token_id (`int`, *optional*, defaults to 151666):
        Id of the begin-of-image token.
    eoi_token_id (`int`, *optional*, defaults to 151667):
        Id of the end-of-image token.
    pad_token_id (`int`, *optional*, defaults to 151643):
        Id of the padding token (also fills unconditional prompts for guidance).
    tie_word_embeddings (`bool`, *optional*):
        Tie the LM head to the input embeddings; defaults to the text config's value.
    """

    model_type = "dualtoken"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_5_3B),
        "vision_config": DualTokenVisionConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    depth_head_config: dict | None = None
    projector_hidden_act: str = "gelu"
    freeze_vision_tokenizer: bool = True
    image_token_id: int = 151665
    boi_token_id: int = 151666
    eoi_token_id: int = 151667
    pad_token_id: int | None = 151643
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        self.depth_head_config = {**DEPTH_HEAD_DEFAULTS, **(self.depth_head_config or {})}
        super().__post_init__(**kwargs)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", False)

    @property
    def num_image_tokens(self) -> int:
        """LLM positions per image: one per cell of the tokenizer's code grid."""
        return self.vision_config.grid_size**2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DualTokenConfig":
        """`"dualtoken-3b"` (Qwen2.5-3B + the paper tokenizer) or `"tiny"` (tests, docs, benchmarks)."""
        if name not in UNIFIED_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(UNIFIED_PRESETS)}")
        settings = merge_settings(UNIFIED_PRESETS[name], overrides)
        vision_preset = settings.pop("vision_preset", "paper")
        settings.setdefault("vision_config", DualTokenVisionConfig.from_preset(vision_preset))
        return cls(**settings)


__all__ = ["DualTokenConfig", "DualTokenVisionConfig"]
