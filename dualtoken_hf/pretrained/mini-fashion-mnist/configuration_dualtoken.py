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
"""Configurations of DualToken: the vision tokenizer, the unified MLLM and their typed sub-configs.

The class defaults describe the paper's tokenizer (the official 2025 release): SigLIP so400m-patch14-384, pixel
codes from block 6 and semantic codes from block 26 of 27, conv ResNet-block projections 1152 <-> 256 and
one 32768 x 256 codebook per branch shared by D = 8 residual depths. `from_preset` gives the later official
layout (`"v2"`) and a tiny one for tests and demos, as small overrides of those defaults.

The quantizer, pixel-decoder and depth-head settings are sub-configs nested the transformers way (as the SigLIP
tower is), each default stated once on its class; a `config.json` that stores them as plain dicts loads unchanged.
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

BRANCHES = ("pixel", "semantic")


def check_branch(branch: str) -> str:
    """`branch` if it names one of the two code branches, else a `ValueError` listing them."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    return branch


# Upper bounds that no real tokenizer comes near (paper: 32768 codes, 8 depths) but that keep an edited config.json from
# allocating terabytes before anything else can complain.
MAX_CODEBOOK_SIZE = 2**24
MAX_DEPTH = 64
# GroupNorm groups of the paper's conv projections (`DualTokenConvProjection`): both widths must be multiples.
RESCONV_NORM_GROUPS = 32


def _check_positive(config: PreTrainedConfig, *names: str):
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be at least 1, got {value}")


def _check_at_most(config: PreTrainedConfig, name: str, limit: int):
    value = getattr(config, name)
    if value > limit:
        raise ValueError(f"{type(config).__name__}.{name} must be at most {limit}, got {value}")


def _check_multiple(value: int, name: str, divisor: int, divisor_name: str):
    if value % divisor:
        raise ValueError(f"{name} ({value}) must be a multiple of {divisor_name} ({divisor})")


@auto_docstring(
    custom_intro="""
    Settings of one [`DualTokenResidualQuantizer`] (eq. 1), a sub-config of [`DualTokenVisionConfig`]. The defaults
    are the paper tokenizer's (the official 2025 release).
    """
)
@strict
class DualTokenQuantizerConfig(PreTrainedConfig):
    r"""
    codebook_size (`int`, *optional*, defaults to 32768):
        Number of codes K per codebook.
    code_dim (`int`, *optional*, defaults to 256):
        Width C of the latents and code embeddings.
    depth (`int`, *optional*, defaults to 8):
        Number of residual depths D.
    shared_codebook (`bool`, *optional*, defaults to `True`):
        One codebook for all depths (otherwise one per depth).
    ema_decay (`float`, *optional*, defaults to 0.99):
        EMA decay of the cluster sizes and per-code sums.
    eps (`float`, *optional*, defaults to 1e-05):
        Laplace smoothing constant of the codebook rewrite.
    restart_dead_codes (`bool`, *optional*, defaults to `True`):
        Restart codes whose EMA cluster size falls below `restart_threshold` from random vectors of the batch.
    restart_threshold (`float`, *optional*, defaults to 1.0):
        Cluster size under which a code counts as dead.
    ema_update_per_depth (`bool`, *optional*, defaults to `True`):
        `True` updates the codebook inside every depth step, so the next depth searches the updated table
        (official `rq`: v1, v2 pixel). `False` searches all depths with the unchanged table, then runs one update
        on all depths' (residual, code) pairs (official `rq_ema`: v2 semantic).
    ema_sum_clamp (`float`, *optional*, defaults to 1000.0):
        Clamp of a batch's per-code vector sums before the EMA (v1: 1000; `None`, as in v2, disables it). Applied
        per process, before the all-reduce, as in the official code.
    official_ema_quirk (`bool`, *optional*, defaults to `False`):
        Only for `ema_update_per_depth=False`: the official `rq_ema` pairs every depth's codes with the *final*
        residual; `True` reproduces that, `False` pairs each depth's codes with its own residual.
    """

    model_type = "dualtoken_quantizer"

    codebook_size: int = 32768
    code_dim: int = 256
    depth: int = 8
    shared_codebook: bool = True
    ema_decay: float | int = 0.99
    eps: float | int = 1e-5
    restart_dead_codes: bool = True
    restart_threshold: float | int = 1.0
    ema_update_per_depth: bool = True
    ema_sum_clamp: float | int | None = 1000.0
    official_ema_quirk: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Check that the sizes describe a quantizer that can be built."""
        _check_positive(self, "codebook_size", "code_dim", "depth")
        _check_at_most(self, "codebook_size", MAX_CODEBOOK_SIZE)
        _check_at_most(self, "depth", MAX_DEPTH)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@auto_docstring(
    custom_intro="""
    Settings of the [`DualTokenPixelDecoder`] that do not follow from the tokenizer (channels, blocks), a sub-config
    of [`DualTokenVisionConfig`]. The defaults are the paper tokenizer's.
    """
)
@strict
class DualTokenPixelDecoderConfig(PreTrainedConfig):
    r"""
    decoder_in_channels (`int`, *optional*, defaults to 1024):
        Channels of the post-quant ResNet block's output, the input of the conv decoder.
    block_out_channels (`list[int]`, *optional*, defaults to `(128, 128, 512, 512, 1024)`):
        Channels per decoder level from the highest resolution to the lowest (the official `ch * ch_mult`).
    layers_per_block (`int`, *optional*, defaults to 2):
        The official `num_res_blocks`; each level has `layers_per_block + 1` ResNet blocks.
    norm_num_groups (`int`, *optional*, defaults to 32):
        GroupNorm groups throughout the decoder.
    out_channels (`int`, *optional*, defaults to 3):
        Image channels.
    """

    model_type = "dualtoken_pixel_decoder"

    decoder_in_channels: int = 1024
    block_out_channels: list[int] | tuple[int, ...] = (128, 128, 512, 512, 1024)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    out_channels: int = 3

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Check that the channels describe a decoder that can be built."""
        _check_positive(self, "decoder_in_channels", "layers_per_block", "norm_num_groups", "out_channels")
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one decoder level, got none")
        for level, channels in enumerate(self.block_out_channels):
            _check_multiple(channels, f"block_out_channels[{level}]", self.norm_num_groups, "norm_num_groups")
        _check_multiple(self.decoder_in_channels, "decoder_in_channels", self.norm_num_groups, "norm_num_groups")

    @property
    def upsampling_factor(self) -> int:
        """Side of the decoded image over side of the decoder's latent grid: one 2x upsampling between levels."""
        return 2 ** (len(self.block_out_channels) - 1)


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
    pixel_quantizer_config (`dict` or [`DualTokenQuantizerConfig`], *optional*):
        The pixel quantizer; missing settings take the paper values.
    semantic_quantizer_config (`dict` or [`DualTokenQuantizerConfig`], *optional*):
        The semantic quantizer; missing settings take the paper values.
    decoder_config (`dict` or [`DualTokenPixelDecoderConfig`], *optional*):
        The pixel decoder's channels and blocks; missing settings take the paper values.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the normal initialiser of the projections.
    siglip_name_or_path (`str`, *optional*):
        The pretrained SigLIP checkpoint the tower was initialised from, recorded by
        [`~DualTokenVisionModel.from_siglip`]. Training that continues from this tokenizer loads it as the frozen
        teacher of the semantic loss (eq. 4), so the target stays the original tower rather than the trained one.

    Example:

    ```python
    >>> from dualtoken_hf import DualTokenVisionConfig, DualTokenVisionModel

    >>> config = DualTokenVisionConfig.from_preset("tiny")
    >>> model = DualTokenVisionModel(config)
    ```"""

    model_type = "dualtoken_vision"
    sub_configs_defaults = {
        "siglip_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=SIGLIP_SO400M_PATCH14_384),
        "pixel_quantizer_config": DualTokenQuantizerConfig,
        "semantic_quantizer_config": DualTokenQuantizerConfig,
        "decoder_config": DualTokenPixelDecoderConfig,
    }

    siglip_config: dict | PreTrainedConfig | None = None
    pixel_layer: int = 6
    semantic_layer: int = 26
    shortcut_layer: int | None = None
    shortcut_weight: float | int = 0.6
    projection_type: str = "resconv"
    causal_up_projection: bool = True
    semantic_feedback: bool = True
    pixel_quantizer_config: dict | PreTrainedConfig | None = None
    semantic_quantizer_config: dict | PreTrainedConfig | None = None
    decoder_config: dict | PreTrainedConfig | None = None
    initializer_range: float | int = 0.02
    siglip_name_or_path: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Reject an impossible layout here, with the plain `ValueError`: `@strict` runs the same check right after
        # `__init__` but would wrap it in `StrictDataclassClassValidationError`, which is not a `ValueError`.
        self.validate_architecture()

    def validate_architecture(self):
        """Check that the tower, the layer taps and the widths describe a model that can be built."""
        if self.projection_type not in PROJECTION_TYPES:
            raise ValueError(f"projection_type must be one of {PROJECTION_TYPES}, got {self.projection_type!r}")
        self._check_tower()
        self._check_layer_taps()
        self._check_widths()

    def _check_tower(self):
        siglip = self.siglip_config
        sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "num_channels")
        _check_positive(siglip, *sizes)
        _check_multiple(
            siglip.hidden_size, "siglip_config.hidden_size", siglip.num_attention_heads, "num_attention_heads"
        )
        if siglip.image_size < siglip.patch_size:
            raise ValueError(
                f"siglip_config.image_size ({siglip.image_size}) must be at least patch_size ({siglip.patch_size}), "
                "else the code grid is empty"
            )
        _check_multiple(
            siglip.image_size,
            "siglip_config.image_size",
            self.decoder_config.upsampling_factor,
            "the pixel decoder's upsampling 2**(len(block_out_channels) - 1)",
        )

    def _check_layer_taps(self):
        num_layers = self.siglip_config.num_hidden_layers
        if not 1 <= self.pixel_layer <= self.semantic_layer <= num_layers:
            raise ValueError(
                f"need 1 <= pixel_layer <= semantic_layer <= num_hidden_layers ({num_layers}), "
                f"got pixel_layer={self.pixel_layer}, semantic_layer={self.semantic_layer}"
            )
        if self.shortcut_layer is not None and not 1 <= self.shortcut_layer <= self.semantic_layer:
            raise ValueError(
                f"shortcut_layer must be in [1, semantic_layer={self.semantic_layer}], got {self.shortcut_layer}"
            )

    def _check_widths(self):
        hidden = self.siglip_config.hidden_size
        groups = self.decoder_config.norm_num_groups
        _check_multiple(hidden, "siglip_config.hidden_size", groups, "decoder_config.norm_num_groups")
        for branch in BRANCHES:
            code_dim = self.quantizer_config(branch).code_dim
            if self.projection_type == "attention" and max(hidden, code_dim) % min(hidden, code_dim):
                raise ValueError(
                    f"projection_type='attention' needs the {branch} code_dim ({code_dim}) and the SigLIP hidden_size "
                    f"({hidden}) to divide one another"
                )
            if self.projection_type == "resconv":
                for name, width in ((f"{branch} code_dim", code_dim), ("siglip_config.hidden_size", hidden)):
                    _check_multiple(width, name, RESCONV_NORM_GROUPS, "the resconv projection's GroupNorm groups")

    @property
    def image_size(self) -> int:
        return self.siglip_config.image_size

    def quantizer_config(self, branch: str) -> DualTokenQuantizerConfig:
        """The quantizer settings of `branch` (`"pixel"` or `"semantic"`)."""
        return {"pixel": self.pixel_quantizer_config, "semantic": self.semantic_quantizer_config}[check_branch(branch)]

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

@auto_docstring(
    custom_intro="""
    Settings of the two depth-transformer heads of [`DualTokenForConditionalGeneration`] (eq. 5), a sub-config of
    [`DualTokenConfig`]. The number of slots and the classifier sizes follow from each branch's quantizer (depth D,
    codebook size K): one classifier per depth. The defaults are the paper model's.
    """
)
@strict
class DualTokenDepthHeadConfig(PreTrainedConfig):
    r"""
    num_layers (`int`, *optional*, defaults to 3):
        Causal transformer layers over the D depth slots.
    hidden_size (`int`, *optional*, defaults to 1024):
        Width of the slots.
    num_attention_heads (`int`, *optional*, defaults to 16):
        Attention heads per layer; must divide `hidden_size`.
    intermediate_size (`int`, *optional*, defaults to 4096):
        Width of the MLP inside each layer.
    hidden_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`):
        Activation of the MLP.
    layer_norm_eps (`float`, *optional*, defaults to 1e-06):
        Epsilon of the layer norms.
    """

    model_type = "dualtoken_depth_head"

    num_layers: int = 3
    hidden_size: int = 1024
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float | int = 1e-6

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Check that the widths describe heads that can be built."""
        _check_positive(self, "num_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )


IMAGE_TOKEN_ID_NAMES = ("image_token_id", "boi_token_id", "eoi_token_id", "pad_token_id")

LOSS_REDUCTIONS = ("sequence", "per_term")

UNIFIED_PRESETS = {
    "dualtoken-3b": {"vision_preset": "paper", "generation_projector": True},
    # Heads for a small LLM and a small code grid (the mini DualToken: SmolLM2-135M, Fashion-MNIST); the tokenizer
    # and LLM settings come from the checkpoints a model is assembled from.
    "mini": {
        "vision_preset": "tiny",
        "generation_projector": True,
        "depth_head_config": {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256},
    },
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
    depth_head_config (`dict` or [`DualTokenDepthHeadConfig`], *optional*):
        The two depth-transformer heads (eq. 5); missing settings take the paper values.
    projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
        Activation of the 2-layer MLP that maps concat(pixel, semantic code embeddings) to the LLM width.
    generation_projector (`bool`, *optional*, defaults to `False`):
        Put one generation projector per branch (Linear-GELU-Linear at the LLM width) between the LLM hidden state
        and that branch's depth head, as the paper's later version does (the `dualtoken-3b` preset). `False` feeds
        the hidden state straight into the heads, as every config written before this setting existed does.
    freeze_vision_tokenizer (`bool`, *optional*, defaults to `True`):
        Keep the tokenizer frozen (no gradients, eval mode, no codebook updates), as in the paper.
    loss_reduction (`str`, *optional*, defaults to `"sequence"`):
        How the training loss normalises eq. 6. `"sequence"`: eq. 6 as written, one sum of the negative
        log-likelihood over every target (each text target gives one term, each image target the 2D terms of
        eq. 8), divided once by the number of target positions (text targets + image targets). `"per_term"`:
        the mean text loss + the mean pixel loss + the mean semantic loss (each image mean is over image targets of
        the per-position sum over depths), which weighs text against images by about N_image / N_text.
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
    base_language_model (`dict`, *optional*):
        Set in a folder that holds only the trained parts: its weights lack the LLM's, which `from_pretrained` loads
        from this base LLM (`name_or_path`, `gguf_file` when it is a GGUF file, and its `vocab_size`; the folder
        keeps the embeddings of the tokens beyond it and the LLM's LoRA adapter), then clears it: the loaded model is
        complete. `None`: the folder is complete.
    """

    model_type = "dualtoken"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_5_3B),
        "vision_config": DualTokenVisionConfig,
        "depth_head_config": DualTokenDepthHeadConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    depth_head_config: dict | PreTrainedConfig | None = None
    projector_hidden_act: str = "gelu"
    generation_projector: bool = False
    freeze_vision_tokenizer: bool = True
    loss_reduction: str = "sequence"
    image_token_id: int = 151665
    boi_token_id: int = 151666
    eoi_token_id: int = 151667
    pad_token_id: int | None = 151643
    tie_word_embeddings: bool | None = None
    base_language_model: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", False)
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        # As in `DualTokenVisionConfig`: the plain `ValueError` here, before `@strict` would wrap it.
        self.validate_token_ids()
        self.validate_architecture()

    def validate_token_ids(self):
        """Check that the image, begin/end-of-image and padding ids are distinct ids of the text vocabulary."""
        super().validate_token_ids()
        vocab_size = self.text_config.vocab_size
        token_ids = {name: getattr(self, name) for name in IMAGE_TOKEN_ID_NAMES}
        for name, token_id in token_ids.items():
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"{name} must be in [0, text_config.vocab_size={vocab_size}), got {token_id}; add the image tokens "
                    "to the text tokenizer and resize the token embeddings first"
                )
        given = [token_id for token_id in token_ids.values() if token_id is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"the image, begin/end-of-image and padding token ids must differ, got {token_ids}")

    def validate_architecture(self):
        """Check that the text model's context holds at least one image with its begin/end tokens."""
        super().validate_architecture()
        context = getattr(self.text_config, "max_position_embeddings", None)
        needed = self.num_image_tokens + 2
        if context is not None and context < needed:
            raise ValueError(
                f"text_config.max_position_embeddings ({context}) must be at least num_image_tokens + 2 ({needed}): "
                "the context must hold one image with its begin/end-of-image tokens"
            )

    @property
    def num_image_tokens(self) -> int:
        """LLM positions per image: one per cell of the tokenizer's code grid."""
        return self.vision_config.grid_size**2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DualTokenConfig":
        """`"dualtoken-3b"` (Qwen2.5-3B + the paper tokenizer), `"mini"` (small heads for a small LLM, e.g. the mini
        DualToken on SmolLM2-135M) or `"tiny"` (tests, docs, benchmarks)."""
        if name not in UNIFIED_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(UNIFIED_PRESETS)}")
        settings = merge_settings(UNIFIED_PRESETS[name], overrides)
        vision_preset = settings.pop("vision_preset")
        settings.setdefault("vision_config", DualTokenVisionConfig.from_preset(vision_preset))
        return cls(**settings)


__all__ = [
    "DualTokenConfig",
    "DualTokenDepthHeadConfig",
    "DualTokenPixelDecoderConfig",
    "DualTokenQuantizerConfig",
    "DualTokenVisionConfig",
]
