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
"""Pixel decoder of DualToken: summed pixel code embeddings → RGB image.

The decoder is the VQGAN / RQ-VAE decoder of the official release, rebuilt from diffusers blocks:

    latents (B, h, w, C)
      → post_projection      C → hidden_size (v2: causal attention projection, v1: conv block)
      → NCHW grid, bilinear resize h×w → latent_size×latent_size
      → post_quant_conv      ResNet block with a 1×1 first conv, hidden_size → decoder_in_channels
      → decoder              diffusers `Decoder` (conv_in, mid block, up blocks, norm/act/conv_out)
      → images (B, 3, H, W)  in the processor's [-1, 1] space; not clamped, no tanh.
"""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

from .configuration_dualtoken import DualTokenPixelDecoderConfig
from .modeling_dualtoken_projection import PointwiseInResnetBlock2D, build_projection


__all__ = ["DualTokenPixelDecoder", "resize_latent_grid"]


def resize_latent_grid(grid: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    r"""
    Resizes an NCHW grid to the decoder's latent size exactly as the official code does.

    Plain bilinear interpolation with `align_corners=False` and **no antialiasing**: the full-size models
    *down*sample 27×27 → 24×24, where an antialiased resize would give different numbers. A grid that already has
    the target size is returned unchanged.

    Args:
        grid (`torch.Tensor`): `(batch, channels, height, width)`.
        size (`int` or `tuple[int, int]`): Target `(height, width)`, or one int for a square.
    """
    if isinstance(size, int):
        size = (size, size)
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False, antialias=False)


class DualTokenPixelDecoder(ModelMixin, ConfigMixin):
    r"""
    The DualToken pixel decoder: reconstructs images from (summed) pixel code embeddings.

    Args:
        latent_channels (`int`): Code width `C` of the pixel branch (v2: 32, v1: 256).
        hidden_size (`int`): Width of the SigLIP tower (1152 for so400m); the up-projection's output width.
        projection_type (`str`): `"attention"` (v2) or `"resconv"` (v1) for `post_projection`.
        sample_size (`int`): Output image side in pixels (384 for the released models).
        decoder_in_channels, block_out_channels, layers_per_block, norm_num_groups, out_channels: as in
            [`DualTokenPixelDecoderConfig`], whose defaults they take. `block_out_channels` is listed from the
            **highest** resolution to the lowest (diffusers convention; the official `ch * ch_mult`).
        up_block_types (`tuple[str, ...]`, *optional*): One diffusers up-block type per level, listed from the
            **lowest** resolution up. Defaults to `AttnUpDecoderBlock2D` at the lowest resolution and
            `UpDecoderBlock2D` elsewhere, matching the official `attn_resolutions`.
        causal_projection (`bool`, *optional*, defaults to `True`): Raster-order causal attention in
            `post_projection` (as in the official v2). Ignored by the v1 conv projection, which is not causal.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        latent_channels: int,
        hidden_size: int,
        projection_type: str,
        sample_size: int,
        # A diffusers model keeps its keyword constructor (its `config.json` is diffusers'); the settings it shares
        # with the tokenizer's decoder sub-config take their defaults from that one class.
        decoder_in_channels: int = DualTokenPixelDecoderConfig.decoder_in_channels,
        block_out_channels: tuple[int, ...] = DualTokenPixelDecoderConfig.block_out_channels,
        layers_per_block: int = DualTokenPixelDecoderConfig.layers_per_block,
        up_block_types: tuple[str, ...] | None = None,
        norm_num_groups: int = DualTokenPixelDecoderConfig.norm_num_groups,
        out_channels: int = DualTokenPixelDecoderConfig.out_channels,
        causal_projection: bool = True,
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        num_levels = len(block_out_channels)
        if up_block_types is None:
            up_block_types = ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (num_levels - 1)
            self.register_to_config(up_block_types=up_block_types)
        up_block_types = tuple(up_block_types)
        if len(up_block_types) != num_levels:
            raise ValueError(
                f"up_block_types must have one entry per level ({num_levels}), got {len(up_block_types)}"
            )
        upsampling = 2 ** (num_levels - 1)
        if sample_size % upsampling != 0:
            raise ValueError(f"sample_size must be divisible by 2**(levels - 1) = {upsampling}, got {sample_size}")

        self.latent_size = sample_size // upsampling
        self.post_projection = build_projection(
            projection_type, latent_channels, hidden_size, causal=causal_projection
        )
        self.post_quant_conv = PointwiseInResnetBlock2D(
            hidden_size, decoder_in_channels, norm_num_groups=norm_num_groups
        )
        self.decoder = Decoder(
            in_channels=decoder_in_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn="silu",
            mid_block_add_attention=True,
        )

    def forward(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        r"""
        Decodes pixel latents into images.

        Args:
            latents (`torch.Tensor` of shape `(batch, height, width, latent_channels)`): Channels-last grid of
                pixel latents, normally the pixel code embeddings summed over depth (or the quantizer output).
            return_dict (`bool`, *optional*, defaults to `True`): Return a [`DecoderOutput`] instead of a tuple.

        Returns:
            [`DecoderOutput`] whose `sample` is `(batch, out_channels, sample_size, sample_size)`.
        """
        channels = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[-1] != channels:
            raise ValueError(
                f"latents must be a channels-last grid of shape (batch, height, width, {channels}), "
                f"got {tuple(latents.shape)}"
            )
        hidden_states = self.post_projection(latents)
        grid = resize_latent_grid(hidden_states.permute(0, 3, 1, 2), self.latent_size)
        grid = self.post_quant_conv(grid)
        images = self.decoder(grid)
        if not return_dict:
            return (images,)
        return DecoderOutput(sample=images)
