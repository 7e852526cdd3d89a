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
"""The DualToken vision tokenizer (paper §3.2, Fig. 2): one SigLIP tower, two residual codebooks.

A shallow block's output (plus an optional shortcut from an earlier block) is projected to the pixel latents and
residual-quantized into pixel codes, which the pixel decoder turns back into an image. A deep block's output is
projected to the semantic latents and quantized into semantic codes; projected back to the SigLIP width, those
replace the hidden state for the remaining blocks and the pooling head, so the pooled output is text-aligned.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SiglipVisionModel
from transformers import initialization as init
from transformers.utils import ModelOutput, auto_docstring, can_return_tuple

from .configuration_dualtoken import DualTokenVisionConfig, check_branch
from .modeling_dualtoken_decoder import DualTokenPixelDecoder
from .modeling_dualtoken_projection import build_projection
from .quantization_dualtoken import DualTokenResidualQuantizer


@auto_docstring(
    custom_intro="""
    Output of [`DualTokenVisionModel.encode`] and [`DualTokenVisionModel.forward`]. Grids are `(B, h, w, ...)`
    in raster order; `D` is the residual depth.
    """
)
@dataclass
class DualTokenVisionOutput(ModelOutput):
    r"""
    pixel_codes (`torch.LongTensor` of shape `(B, h, w, D)`):
        Pixel codebook indices.
    semantic_codes (`torch.LongTensor` of shape `(B, h, w, D)`):
        Semantic codebook indices.
    pixel_latents (`torch.FloatTensor` of shape `(B, h, w, C)`):
        Continuous pixel latents handed to the pixel quantizer (projection of the pixel layer, plus the weighted
        shortcut projection when configured).
    semantic_latents (`torch.FloatTensor` of shape `(B, h, w, C)`):
        Continuous semantic latents handed to the semantic quantizer.
    pixel_embeddings (`torch.FloatTensor` of shape `(B, h, w, C)`):
        Pixel code embeddings summed over depth, with a straight-through gradient to `pixel_latents`.
    semantic_embeddings (`torch.FloatTensor` of shape `(B, h, w, C)`):
        The same for the semantic branch.
    semantic_features (`torch.FloatTensor` of shape `(B, h*w, hidden)`):
        With `semantic_feedback`: the semantic embeddings projected back to the SigLIP width, which replace the
        hidden state after the semantic layer. Without it: the semantic layer's own output.
    last_hidden_state (`torch.FloatTensor` of shape `(B, h*w, hidden)`):
        Output of the post-layernorm, the input of the pooling head.
    pooler_output (`torch.FloatTensor` of shape `(B, hidden)`):
        Output of the SigLIP attention-pooling head.
    pixel_commitment_loss (`torch.FloatTensor` scalar):
        Eq. 1 for the pixel branch.
    semantic_commitment_loss (`torch.FloatTensor` scalar):
        Eq. 1 for the semantic branch.
    commitment_loss (`torch.FloatTensor` scalar):
        Their sum, the `L_c1 + L_c2` of eq. 2.
    reconstruction (`torch.FloatTensor` of shape `(B, 3, H, W)`, *forward only*):
        Pixel decoder output in the normalized [-1, 1] image space (not clamped).
    reconstruction_loss (`torch.FloatTensor` scalar, *forward only*):
        Mean squared error between `reconstruction` and the input.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        With `output_hidden_states=True`: the patch embeddings, then every block's output that was run. The
        entry of the semantic layer is its unquantized output; later entries are computed from the quantized
        semantic features.
    """

    pixel_codes: torch.LongTensor | None = None
    semantic_codes: torch.LongTensor | None = None
    pixel_latents: torch.FloatTensor | None = None
    semantic_latents: torch.FloatTensor | None = None
    pixel_embeddings: torch.FloatTensor | None = None
    semantic_embeddings: torch.FloatTensor | None = None
    semantic_features: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    pixel_commitment_loss: torch.FloatTensor | None = None
    semantic_commitment_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None

    def branch_codes(self, branch: str) -> torch.LongTensor:
        """The codes of `branch` (`"pixel"` or `"semantic"`)."""
        return {"pixel": self.pixel_codes, "semantic": self.semantic_codes}[check_branch(branch)]


@auto_docstring
class DualTokenVisionPreTrainedModel(PreTrainedModel):
    config: DualTokenVisionConfig
    # The attribute that holds the tokenizer in a model built on it (`DualTokenForConditionalGeneration`).
    base_model_prefix = "vision_tokenizer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # The SigLIP tower's own entries (encoder layers, pooling head) are collected from `self.siglip` by `post_init`.
    _no_split_modules = ["DualTokenPixelDecoder"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, DualTokenResidualQuantizer):
            # eq. 1 codebooks start as N(0, 1) with the EMA sums equal to the table and zero counts (official init).
            init.normal_(module.codebook)
            init.copy_(module.embed_ema, module.codebook)
            init.zeros_(module.cluster_size_ema)
        elif isinstance(module, nn.Conv2d):
            # PyTorch's own conv init: the decoder and conv projections are trained from it in VQGAN-style recipes.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)


@auto_docstring(
    custom_intro="""
    The DualToken vision tokenizer: `encode` images into pixel and semantic codes, `decode` pixel codes into images,
    `forward` for training (reconstruction plus both branches' commitment losses).

    The SigLIP tower is held unchanged as `self.siglip` (a `SiglipVisionModel`), so its state-dict names are
    SigLIP's and a pretrained tower loads directly (see [`~DualTokenVisionModel.from_siglip`]).

    Example:

    ```python
    >>> from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionConfig, DualTokenVisionModel

    >>> model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).eval()
    >>> processor = DualTokenImageProcessor.from_preset("tiny")
    >>> pixel_values = processor(image, return_tensors="pt").pixel_values
    >>> codes = model.encode(pixel_values)
    >>> codes.pixel_codes.shape  # (1, 8, 8, 4)
    >>> images = processor.postprocess(model.decode(codes.pixel_codes))
    ```
    """
)
class DualTokenVisionModel(DualTokenVisionPreTrainedModel):
    def __init__(self, config: DualTokenVisionConfig):
        super().__init__(config)
        config.validate_architecture()
        hidden = config.siglip_config.hidden_size
        pixel_dim = config.pixel_quantizer_config.code_dim
        semantic_dim = config.semantic_quantizer_config.code_dim

        self.siglip = SiglipVisionModel(config.siglip_config)
        self.pixel_projection = build_projection(config.projection_type, hidden, pixel_dim)
        self.shortcut_projection = (
            # CODEPATH: v2 release (and the tiny preset) add a projected shortcut from an earlier block (v2: block 4,
            # x0.6) to the pixel latents; the paper (v1) release has no shortcut (`shortcut_layer=None`).
            build_projection(config.projection_type, hidden, pixel_dim) if config.shortcut_layer is not None else None
        )
        self.semantic_projection = build_projection(config.projection_type, hidden, semantic_dim)
        self.pixel_quantizer = DualTokenResidualQuantizer(config.pixel_quantizer_config)
        self.semantic_quantizer = DualTokenResidualQuantizer(config.semantic_quantizer_config)
        self.semantic_up_projection = build_projection(
            config.projection_type, semantic_dim, hidden, causal=config.causal_up_projection
        )
        decoder = config.decoder_config
        self.pixel_decoder = DualTokenPixelDecoder(
            latent_channels=pixel_dim,
            hidden_size=hidden,
            projection_type=config.projection_type,
            sample_size=config.image_size,
            decoder_in_channels=decoder.decoder_in_channels,
            block_out_channels=decoder.block_out_channels,
            layers_per_block=decoder.layers_per_block,
            norm_num_groups=decoder.norm_num_groups,
            out_channels=decoder.out_channels,
            causal_projection=config.causal_up_projection,
        )
        self.post_init()

    @classmethod
    def from_siglip(
        cls, name_or_path, preset: str = "paper", use_safetensors: bool = True, **config_overrides
    ) -> "DualTokenVisionModel":
        """Start a tokenizer from a pretrained SigLIP vision tower, as the paper does.

        `name_or_path` is anything `SiglipVisionModel.from_pretrained` accepts (a full SigLIP checkpoint works too);
        its weights are read from safetensors files only unless `use_safetensors=False` (pickled `.bin` weights of
        a trusted checkpoint). The tokenizer layout comes from `preset` plus `config_overrides`; the tower's own
        config replaces the preset's. Projections, codebooks and the pixel decoder start from random initialisation.
        `name_or_path` is recorded as `config.siglip_name_or_path`, the teacher of later training (eq. 4).
        """
        tower = SiglipVisionModel.from_pretrained(name_or_path, use_safetensors=use_safetensors)
        config = DualTokenVisionConfig.from_preset(
            preset, siglip_config=tower.config.to_dict(), siglip_name_or_path=str(name_or_path), **config_overrides
        )
        model = cls(config)
        model.siglip.load_state_dict(tower.state_dict())
        return model

    def _check_pixel_values(self, pixel_values: torch.Tensor):
        """The checks of `encode`'s input: one reduction for the values, the rest from the tensor's metadata."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(
                f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; use DualTokenImageProcessor"
                "(..., return_tensors='pt') to turn images into pixel_values"
            )
        size, channels = self.config.image_size, self.config.siglip_config.num_channels
        expected = f"(batch, {channels}, {size}, {size})"
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have 4 dimensions {expected}, got {pixel_values.dim()} with shape "
                f"{tuple(pixel_values.shape)}; add a batch dimension with pixel_values[None]"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values must hold at least one image, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape {expected} with {channels} channels first, got "
                f"{tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[2:] != (size, size):
            raise ValueError(
                f"pixel_values must have shape {expected} ({size} px is the config's image_size), got "
                f"{tuple(pixel_values.shape)}; use DualTokenImageProcessor to resize and crop images"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor in [-1, 1], got {pixel_values.dtype}; use "
                "DualTokenImageProcessor to rescale and normalize 8-bit images"
            )
        if pixel_values.device.type != "meta":  # meta tensors carry shapes, not values
            # min and max propagate NaN and inf: one reduction, about 10x cheaper than `isfinite(...).all()` on a CPU
            if not torch.isfinite(torch.stack(torch.aminmax(pixel_values.detach()))).all():
                raise ValueError("pixel_values must be finite, got NaN or inf values")

    def _check_codes(self, codes: torch.Tensor, branch: str):
        """The checks of codes handed to `decode` and `semantic_features_from_codes`, naming the branch."""
        name = f"{branch}_codes"
        side, quantizer = self.config.grid_size, self.quantizer(branch)
        expected = f"(batch, {side}, {side}, {quantizer.depth})"
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor {expected}, got {type(codes).__name__}")
        if codes.dim() != 4 or codes.shape[1:] != (side, side, quantizer.depth) or codes.shape[0] == 0:
            raise ValueError(f"{name} must have shape {expected} with batch >= 1, got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {codes.dtype}")
        if codes.device.type != "meta":  # meta tensors carry shapes, not values
            low, high = torch.aminmax(codes)
            if low < 0 or high >= quantizer.codebook_size:
                raise ValueError(
                    f"{name} must be in [0, {quantizer.codebook_size}), got min {low.item()} and max {high.item()}"
                )

    def _to_grid(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C) sequence in raster order -> (B, h, w, C) grid."""
        side = self.config.grid_size
        return hidden_states.unflatten(1, (side, side))

    def encode(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, codes_only: bool = False
    ) -> DualTokenVisionOutput:
        """Tokenize normalized images `(B, 3, H, W)` in [-1, 1] into pixel and semantic codes.

        Runs no block past the semantic layer unless `config.semantic_feedback` is set (then the remaining blocks
        and the pooling head run on the quantized semantic features). `codes_only=True` (tokenizing a dataset, the
        unified model reading images) stops after the two quantizers: no block past the semantic layer, no
        post-layernorm and no pooling head run, and `semantic_features`, `last_hidden_state` and `pooler_output`
        are `None`; the codes are the same.
        """
        self._check_pixel_values(pixel_values)
        config = self.config
        layers = self.siglip.encoder.layers
        hidden_states = self.siglip.embeddings(pixel_values.to(self.dtype))
        all_hidden_states = [hidden_states]
        shortcut_latents = pixel_latents = None
        for index, layer in enumerate(layers[: config.semantic_layer], start=1):
            hidden_states = layer(hidden_states, None)
            all_hidden_states.append(hidden_states)
            # CODEPATH: v2 release taps the shortcut at block 4 (tiny preset: block 1); the paper (v1) release has
            # `shortcut_layer=None`, so no index matches and this never runs.
            if index == config.shortcut_layer:
                shortcut_latents = self.shortcut_projection(self._to_grid(hidden_states))
            # CODEPATH: every checkpoint taps the pixel branch at exactly one block (paper and v2 releases: block 6,
            # tiny preset: block 2); the other blocks only pass through.
            if index == config.pixel_layer:
                pixel_latents = self.pixel_projection(self._to_grid(hidden_states))
        if shortcut_latents is not None:
            pixel_latents = pixel_latents + config.shortcut_weight * shortcut_latents

        pixel = self.pixel_quantizer(pixel_latents)
        semantic_latents = self.semantic_projection(self._to_grid(hidden_states))
        semantic = self.semantic_quantizer(semantic_latents)

        semantic_features = last_hidden_state = pooler_output = None
        if not codes_only:
            # CODEPATH: both official releases (paper/v1 and v2) and every preset feed the quantized semantics back
            # through the remaining blocks and the pooling head. `semantic_feedback=False` is no released checkpoint:
            # it is the ablation that pools the unquantized semantic layer (kept for experiments, covered by tests).
            if config.semantic_feedback:
                semantic_features = self.semantic_up_projection(semantic.quantized_latents).flatten(1, 2)
                hidden_states = semantic_features
                for layer in layers[config.semantic_layer :]:
                    hidden_states = layer(hidden_states, None)
                    all_hidden_states.append(hidden_states)
            else:
                semantic_features = hidden_states
            last_hidden_state = self.siglip.post_layernorm(hidden_states)
            pooler_output = self.siglip.head(last_hidden_state) if self.siglip.use_head else None

        return DualTokenVisionOutput(
            pixel_codes=pixel.codes,
            semantic_codes=semantic.codes,
            pixel_latents=pixel_latents,
            semantic_latents=semantic_latents,
            pixel_embeddings=pixel.quantized_latents,
            semantic_embeddings=semantic.quantized_latents,
            semantic_features=semantic_features,
            last_hidden_state=last_hidden_state,
            pooler_output=pooler_output,
            pixel_commitment_loss=pixel.commitment_loss,
            semantic_commitment_loss=semantic.commitment_loss,
            commitment_loss=pixel.commitment_loss + semantic.commitment_loss,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )

    # ------------------------------------------------------------------------------------- the two branches

    def quantizer(self, branch: str) -> DualTokenResidualQuantizer:
        """The residual quantizer of `branch` (`"pixel"` or `"semantic"`), e.g. for its `codebook_statistics` or,
        in sampling loops, its unchecked `embed_codes_at_depth`."""
        return {"pixel": self.pixel_quantizer, "semantic": self.semantic_quantizer}[check_branch(branch)]

    def embed_codes(self, codes: torch.LongTensor, branch: str = "pixel", per_depth: bool = False) -> torch.Tensor:
        """Look up code embeddings: `(B, h, w, D)` codes -> `(B, h, w, C)` summed over depth, or
        `(B, h, w, D, C)` with `per_depth=True`. `branch` is `"pixel"` or `"semantic"`."""
        quantizer = self.quantizer(branch)
        return quantizer.embed_codes_per_depth(codes) if per_depth else quantizer.embed_codes(codes)

    def semantic_features_from_codes(self, semantic_codes: torch.LongTensor) -> torch.Tensor:
        """Semantic codes `(B, h, w, D)` -> the features `(B, h*w, hidden)` that replace the semantic layer's
        output (the up-projection of the summed code embeddings)."""
        self._check_codes(semantic_codes, "semantic")
        embeddings = self.embed_codes(semantic_codes, "semantic")
        return self.semantic_up_projection(embeddings).flatten(1, 2)

    def decode(self, pixel_codes: torch.LongTensor) -> torch.Tensor:
        """Pixel codes `(B, h, w, D)` -> images `(B, 3, H, W)` in the normalized [-1, 1] space.

        The decoder output is not clamped; `DualTokenImageProcessor.postprocess` clamps when converting to images.
        """
        self._check_codes(pixel_codes, "pixel")
        return self.decode_embeddings(self.embed_codes(pixel_codes, "pixel"))

    def decode_embeddings(self, pixel_embeddings: torch.Tensor) -> torch.Tensor:
        """Summed pixel code embeddings `(B, h, w, C)` -> images `(B, 3, H, W)`."""
        return self.pixel_decoder(pixel_embeddings.to(self.dtype)).sample

    @can_return_tuple
    @auto_docstring(
        custom_intro="""
        Encode, then reconstruct from the straight-through pixel embeddings (the training forward).

        In training mode the quantizers also update their codebooks by EMA and restart dead codes. Weighting the
        terms (eq. 2) and the perceptual, adversarial and semantic losses belong to the training script, which owns
        the extra networks they need. Keyword arguments go to [`~DualTokenVisionModel.encode`]:
        `output_hidden_states=True` returns the patch embeddings and every block's output that was run as
        `hidden_states`. `return_dict=False` returns a tuple.
        """
    )
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> DualTokenVisionOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            Images normalized to [-1, 1] by [`DualTokenImageProcessor`].

        Returns:
            [`DualTokenVisionOutput`]: the output of `encode` with `reconstruction` and `reconstruction_loss` added.
        """
        # `encode` owns the hidden-state collection (`output_hidden_states` is its public argument).
        output = self.encode(pixel_values, **kwargs)
        output.reconstruction = self.decode_embeddings(output.pixel_embeddings)
        output.reconstruction_loss = F.mse_loss(output.reconstruction.float(), pixel_values.float())
        return output


__all__ = ["DualTokenVisionModel", "DualTokenVisionOutput", "DualTokenVisionPreTrainedModel"]
