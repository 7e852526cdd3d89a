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
"""Projections between the SigLIP width (`hidden_size`) and the codebook width (`C`).

DualToken moves features into and out of the residual quantizers through small learned projections:

- the v2 release uses [`DualTokenAttentionProjection`] (a one-block attention "transformer" whose attention
  averages heads on the way down and concatenates them on the way up);
- the v1 (paper) release uses [`DualTokenConvProjection`], a ResNet-style conv block whose first conv is 1×1.

Every projection here takes and returns a channels-last grid `(batch, height, width, channels)`, so the callers
never care which flavour they hold. [`build_projection`] picks the flavour from a config string.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


__all__ = [
    "DualTokenAttentionProjection",
    "DualTokenConvProjection",
    "DualTokenGegluMlp",
    "DualTokenProjectionAttention",
    "PointwiseInResnetBlock2D",
    "build_projection",
]


def _check_grid(grid: torch.Tensor, channels: int, name: str) -> None:
    if grid.ndim != 4 or grid.shape[-1] != channels:
        raise ValueError(
            f"{name} expects a channels-last grid of shape (batch, height, width, {channels}), "
            f"got {tuple(grid.shape)}"
        )


class DualTokenProjectionAttention(nn.Module):
    r"""
    Multi-head self-attention that changes the width (official v2 `attn` inside `AttnProjection`).

    The head count `H` and head width `hd = max(in_dim, out_dim) / H` are chosen so that `H · hd` is the wider of
    the two widths. Queries, keys and values come from one bias-free `qkv` linear layer plus a separate
    (q_bias, 0, v_bias) bias; keys have no bias.

    - **Down** (`in_dim > out_dim`): the per-head outputs are *averaged over heads*, giving width `hd`, which must
      equal `out_dim`.
    - **Up** (`in_dim <= out_dim`): the heads are concatenated, giving width `H · hd`, which must equal `out_dim`.

    Either way a final `proj` Linear(out_dim → out_dim) follows.

    Args:
        in_dim (`int`): Input width.
        out_dim (`int`): Output width.
        num_heads (`int`): Number of heads `H`; must divide `max(in_dim, out_dim)`.
        causal (`bool`): If `True`, position `i` attends to positions `≤ i` in raster order.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False):
        super().__init__()
        wide = max(in_dim, out_dim)
        if num_heads < 1 or wide % num_heads != 0:
            raise ValueError(f"num_heads must be a positive divisor of max(in_dim, out_dim)={wide}, got {num_heads}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.head_dim = wide // num_heads
        self.causal = causal
        self.averages_heads = in_dim > out_dim
        mixed_dim = self.head_dim if self.averages_heads else num_heads * self.head_dim
        if mixed_dim != out_dim:
            # The official code would adaptive-average-pool here; no official config reaches that branch.
            raise ValueError(
                f"attention projection {in_dim}->{out_dim} with {num_heads} heads yields width {mixed_dim}, "
                f"expected {out_dim}; choose num_heads = max(in_dim, out_dim) // min(in_dim, out_dim)"
            )

        inner_dim = num_heads * self.head_dim
        self.qkv = nn.Linear(in_dim, 3 * inner_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner_dim))
        self.v_bias = nn.Parameter(torch.zeros(inner_dim))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Maps `(batch, positions, in_dim)` to `(batch, positions, out_dim)`."""
        batch_size, num_positions, _ = hidden_states.shape
        # Keys carry no bias; zeros are built on the fly so no all-zero buffer has to live in the checkpoint.
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(hidden_states, self.qkv.weight, qkv_bias)
        qkv = qkv.reshape(batch_size, num_positions, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=self.causal)
        if self.averages_heads:
            attended = attended.mean(dim=1)
        else:
            attended = attended.transpose(1, 2).reshape(batch_size, num_positions, -1)
        return self.proj(attended)


class DualTokenGegluMlp(nn.Module):
    r"""
    GeGLU feed-forward with its own pre-LayerNorm (eps 1e-6): `w2(gelu_tanh(w0(n)) · w1(n))`, `n = norm(x)`.

    Args:
        dim (`int`): Input and output width.
        hidden_dim (`int`): Width of the gated hidden layer (official: `2 · dim`).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w0 = nn.Linear(dim, hidden_dim)
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden_states)
        return self.w2(F.gelu(self.w0(normed), approximate="tanh") * self.w1(normed))


class DualTokenAttentionProjection(nn.Module):
    r"""
    Attention projection of DualToken v2 (official `AttnProjection`).

    With `x` the flattened grid, `y = proj(norm3(x)) + attn(norm1(x))` and the output is `y + mlp(norm2(y))`.
    `norm1/2/3` are LayerNorms with eps 1e-5; the MLP applies its own LayerNorm (eps 1e-6) on top of `norm2`, so
    that branch normalises twice, exactly as the official block does.

    Args:
        in_dim (`int`): Input width (`hidden_size` for the encoder-side projections, the code width otherwise).
        out_dim (`int`): Output width.
        num_heads (`int`): Attention heads; official configs use `max(in_dim, out_dim) // min(in_dim, out_dim)`.
        causal (`bool`, *optional*, defaults to `False`): Causal (raster-order) attention. The official
            up-projections after the quantizers are causal, the down-projections before them are not.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.norm1 = nn.LayerNorm(in_dim, eps=1e-5)
        self.attn = DualTokenProjectionAttention(in_dim, out_dim, num_heads=num_heads, causal=causal)
        self.norm3 = nn.LayerNorm(in_dim, eps=1e-5)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim, eps=1e-5)
        self.mlp = DualTokenGegluMlp(out_dim, 2 * out_dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """Maps a channels-last grid `(batch, height, width, in_dim)` to `(batch, height, width, out_dim)`."""
        _check_grid(grid, self.in_dim, type(self).__name__)
        batch_size, height, width, _ = grid.shape
        # Raster order: position p = row * width + column, which is what the causal mask refers to.
        hidden_states = grid.reshape(batch_size, height * width, self.in_dim)
        hidden_states = self.proj(self.norm3(hidden_states)) + self.attn(self.norm1(hidden_states))
        hidden_states = hidden_states + self.mlp(self.norm2(hidden_states))
        return hidden_states.reshape(batch_size, height, width, self.out_dim)


class PointwiseInResnetBlock2D(ResnetBlock2D):
    r"""
    A diffusers [`~diffusers.models.resnet.ResnetBlock2D`] whose first conv is 1×1 instead of 3×3.

    This is the VQGAN-style block DualToken uses for its v1 projections and for the decoder's `post_quant_conv`:
    GroupNorm, SiLU, **1×1** conv, GroupNorm, SiLU, dropout, 3×3 conv, plus a 1×1 `conv_shortcut` when the
    width changes. It has no timestep embedding and works on NCHW tensors like its parent.

    Args:
        in_channels (`int`): Input channels.
        out_channels (`int`): Output channels.
        norm_num_groups (`int`, *optional*, defaults to 32): GroupNorm groups (both norms).
        eps (`float`, *optional*, defaults to 1e-6): GroupNorm epsilon.
        dropout (`float`, *optional*, defaults to 0.0): Dropout before the second conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
    ):
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            temb_channels=None,
            groups=norm_num_groups,
            eps=eps,
            dropout=dropout,
            non_linearity="silu",
        )
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_tensor, temb)


class DualTokenConvProjection(PointwiseInResnetBlock2D):
    r"""
    Conv projection of DualToken v1 (the paper release): a [`PointwiseInResnetBlock2D`] on a channels-last grid.

    The 3×3 second conv mixes neighbouring grid positions, so unlike the attention projection this block is never
    causal.

    Args:
        in_channels (`int`): Input width.
        out_channels (`int`): Output width.
        norm_num_groups (`int`, *optional*, defaults to 32): GroupNorm groups; both widths must be multiples.
        eps (`float`, *optional*, defaults to 1e-6): GroupNorm epsilon.
    """

    def forward(self, grid: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """Maps a channels-last grid `(batch, height, width, in_channels)` to `(..., out_channels)`."""
        _check_grid(grid, self.in_channels, type(self).__name__)
        sample = super().forward(grid.permute(0, 3, 1, 2), temb)
        return sample.permute(0, 2, 3, 1)


def build_projection(
    projection_type: Literal["attention", "resconv"],
    in_dim: int,
    out_dim: int,
    causal: bool = False,
) -> nn.Module:
    r"""
    Builds the projection `in_dim → out_dim` used by a DualToken release.

    Args:
        projection_type (`str`): `"attention"` (v2, [`DualTokenAttentionProjection`] with
            `max(in_dim, out_dim) // min(in_dim, out_dim)` heads) or `"resconv"` (v1, [`DualTokenConvProjection`]).
        in_dim (`int`): Input width.
        out_dim (`int`): Output width.
        causal (`bool`, *optional*, defaults to `False`): Raster-order causal attention. Ignored for `"resconv"`:
            the official v1 conv block has no causal form (its 3×3 conv sees both neighbours).

    Returns:
        `nn.Module` mapping a channels-last grid `(batch, height, width, in_dim)` to `(..., out_dim)`.
    """
    if projection_type == "attention":
        num_heads = max(in_dim, out_dim) // min(in_dim, out_dim)
        return DualTokenAttentionProjection(in_dim, out_dim, num_heads=num_heads, causal=causal)
    if projection_type == "resconv":
        return DualTokenConvProjection(in_dim, out_dim)
    raise ValueError(f"projection_type must be 'attention' or 'resconv', got {projection_type!r}")
