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
"""Residual quantizer of the DualToken vision tokenizer (RQ-VAE style, EMA codebooks, dead-code restart).

Imports only torch, transformers and its sibling config module, so it ships in a Hub repository as remote code.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import ModelOutput, auto_docstring

from .configuration_dualtoken import DualTokenQuantizerConfig


# Codebook columns per block of the CPU nearest-code search: a block of distances stays in cache instead of a
# (positions x K) matrix (96 MB per image and depth at K = 32768) making several trips through memory.
SEARCH_BLOCK = 2048


@auto_docstring(custom_intro="Output of [`DualTokenResidualQuantizer`].")
@dataclass
class ResidualQuantizerOutput(ModelOutput):
    r"""
    quantized_latents (`torch.FloatTensor` of shape `(batch_size, height, width, code_dim)`):
        Straight-through quantized latents: `latents + (sum_d embeddings_d - latents).detach()`. The value is the
        sum of the D looked-up embeddings, the gradient with respect to `latents` is the identity. Same dtype as
        the latents.
    codes (`torch.LongTensor` of shape `(batch_size, height, width, depth)`):
        Codebook indices chosen at each depth.
    commitment_loss (`torch.FloatTensor` of shape `()`):
        Eq. 1 commitment loss, the mean over depths d of `mean((latents - sg(partial_sum_d))**2)` ("cumsum"
        variant, no beta inside). Same dtype as the latents.
    """

    quantized_latents: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None


class DualTokenResidualQuantizer(nn.Module):
    """
    Residual quantizer with EMA-updated codebooks (eq. 1 of the DualToken paper).

    A latent grid `(B, h, w, C)` is quantized over `depth` steps: each depth picks the nearest codebook entry of the
    current residual and subtracts it. The codebooks are buffers, never trained by gradient; in training mode they
    follow an exponential moving average of the vectors assigned to each code (with Laplace smoothing) and codes whose
    EMA cluster size drops below `restart_threshold` are restarted from random vectors of the batch.

    Args:
        config ([`DualTokenQuantizerConfig`]): Codebook sizes, depth and EMA schedule (documented there).
    """

    def __init__(self, config: DualTokenQuantizerConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.code_dim = config.code_dim
        self.depth = config.depth
        self.shared_codebook = config.shared_codebook
        self.ema_decay = config.ema_decay
        self.eps = config.eps
        self.restart_dead_codes = config.restart_dead_codes
        self.restart_threshold = config.restart_threshold
        self.ema_update_per_depth = config.ema_update_per_depth
        self.ema_sum_clamp = config.ema_sum_clamp
        self.official_ema_quirk = config.official_ema_quirk

        num_codebooks = 1 if self.shared_codebook else self.depth
        self.codebook = nn.Buffer(torch.empty(num_codebooks, self.codebook_size, self.code_dim))
        self.cluster_size_ema = nn.Buffer(torch.empty(num_codebooks, self.codebook_size))
        self.embed_ema = nn.Buffer(torch.empty(num_codebooks, self.codebook_size, self.code_dim))
        self.reset_parameters()

    @property
    def num_codebooks(self) -> int:
        return self.codebook.shape[0]

    @torch.no_grad()
    def reset_parameters(self):
        """Official init: codebook ~ N(0, 1), `embed_ema` a copy of it, `cluster_size_ema` zeros."""
        self.codebook.normal_()
        self.embed_ema.copy_(self.codebook)
        self.cluster_size_ema.zero_()

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, depth={self.depth}, "
            f"shared_codebook={self.shared_codebook}, ema_update_per_depth={self.ema_update_per_depth}"
        )

    def forward(self, latents: torch.Tensor) -> ResidualQuantizerOutput:
        """
        Quantize `latents` of shape `(B, h, w, code_dim)` over all depths (eq. 1).

        In training mode the codebooks are EMA-updated as a side effect (see the class docstring for the two
        schedules). The nearest-neighbour search always runs in fp32, also under autocast.
        """
        self._check_latents(latents)
        # Meta tensors (shape checks of full-size models) have no autocast state of their own to switch off.
        device_type = "cpu" if latents.device.type == "meta" else latents.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            latents_fp32 = latents.float()
            residual = latents_fp32.detach()
            partial_sum = torch.zeros_like(residual)
            partial_sums, depth_codes, depth_residuals = [], [], []
            update_per_depth = self.training and self.ema_update_per_depth
            codebook_norms = {}  # per codebook, until its next EMA rewrite
            for d in range(self.depth):
                index = self._codebook_index(d)
                if index not in codebook_norms:
                    codebook_norms[index] = self._codebook_norms(index)
                codes_d = self._nearest_codes(residual, index, codebook_norms[index])
                # The embeddings come from the table *before* this depth's EMA rewrite (official order).
                embeddings_d = self.codebook[index][codes_d].float()
                if update_per_depth:
                    self._ema_update(index, residual, codes_d)
                    del codebook_norms[index]
                depth_residuals.append(residual)
                depth_codes.append(codes_d)
                residual = residual - embeddings_d
                partial_sum = partial_sum + embeddings_d
                partial_sums.append(partial_sum)
            if self.training and not self.ema_update_per_depth:
                if self.official_ema_quirk:
                    depth_residuals = [residual] * self.depth
                self._ema_update_after_all_depths(depth_residuals, depth_codes)

            commitment_loss = torch.stack([(latents_fp32 - s).pow(2.0).mean() for s in partial_sums]).mean()
            quantized_latents = latents + (partial_sum.to(latents.dtype) - latents).detach()
        return ResidualQuantizerOutput(
            quantized_latents=quantized_latents,
            codes=torch.stack(depth_codes, dim=-1),
            commitment_loss=commitment_loss.to(latents.dtype),
        )

    def embed_codes_per_depth(self, codes: torch.LongTensor) -> torch.Tensor:
        """Look up the embeddings of `codes` `(B, h, w, D)` at each depth, giving `(B, h, w, D, code_dim)`."""
        self._check_codes(codes)
        return torch.stack([self.codebook[self._codebook_index(d)][codes[..., d]] for d in range(self.depth)], dim=-2)

    def embed_codes_at_depth(self, codes: torch.LongTensor, d: int) -> torch.Tensor:
        """Embeddings of the codes of one depth `d` (0-based) for codes of any shape, giving `(..., code_dim)`.

        Unchecked fast path for sampling loops, which produce codes by construction in `[0, K)`."""
        return self.codebook[self._codebook_index(d)][codes]

    def embed_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        """Embeddings of `codes` `(B, h, w, D)` summed over depth (eq. 1 reconstruction), giving `(B, h, w, C)`."""
        return self.embed_codes_per_depth(codes).sum(dim=-2)

    @torch.no_grad()
    def code_counts(self, codes: torch.LongTensor) -> torch.LongTensor:
        """Per-depth code histogram `(D, K)` of `codes` `(B, h, w, D)`."""
        self._check_codes(codes)
        flat_codes = codes.reshape(-1, self.depth)
        return torch.stack([torch.bincount(flat_codes[:, d], minlength=self.codebook_size) for d in range(self.depth)])

    @torch.no_grad()
    def dead_codes(self) -> torch.LongTensor:
        """Per depth `(D,)`: codes of that depth's codebook whose `cluster_size_ema` is below `restart_threshold`."""
        return torch.stack(
            [(self.cluster_size_ema[self._codebook_index(d)] < self.restart_threshold).sum() for d in range(self.depth)]
        )

    @torch.no_grad()
    def codebook_statistics(self, codes: torch.LongTensor) -> dict[str, torch.Tensor]:
        """
        Per-depth codebook health for logging, from `codes` `(B, h, w, D)` of this process.

        Returns a dict of 1-D tensors of length D: `"usage"` and `"perplexity"` of the code histogram (see
        [`code_histogram_statistics`]) and `"dead_codes"` (see [`~DualTokenResidualQuantizer.dead_codes`]).
        """
        return {**code_histogram_statistics(self.code_counts(codes)), "dead_codes": self.dead_codes()}

    def _codebook_index(self, d: int) -> int:
        return 0 if self.shared_codebook else d

    def _check_latents(self, latents: torch.Tensor):
        if latents.ndim != 4 or latents.shape[-1] != self.code_dim:
            raise ValueError(
                f"latents must have shape (batch_size, height, width, {self.code_dim}), got {tuple(latents.shape)}"
            )
        if not latents.is_floating_point() or latents.numel() == 0:
            raise ValueError(
                f"latents must be a non-empty floating-point tensor, got {latents.dtype}, {tuple(latents.shape)}"
            )

    def _check_codes(self, codes: torch.Tensor):
        if codes.ndim != 4 or codes.shape[-1] != self.depth:
            raise ValueError(
                f"codes must have shape (batch_size, height, width, {self.depth}), got {tuple(codes.shape)}"
            )
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() > 0 and codes.device.type != "meta":  # meta tensors carry shapes, not values
            low, high = codes.min().item(), codes.max().item()
            if low < 0 or high >= self.codebook_size:
                raise ValueError(f"codes must be in [0, {self.codebook_size}), got min {low} and max {high}")

    @torch.no_grad()
    def _codebook_norms(self, index: int) -> torch.Tensor:
        """`(1, K)` squared norms of codebook `index`, reduced exactly as the official code does."""
        return self.codebook[index].float().t().pow(2.0).sum(dim=0, keepdim=True)

    @torch.no_grad()
    def _nearest_codes(self, residual: torch.Tensor, index: int, codebook_norms: torch.Tensor) -> torch.LongTensor:
        """The nearest code of codebook `index` to each residual: argmin of ||r||^2 + ||e||^2 - 2 r.e.

        Every distance is the official one bit for bit (the same fp32 sum, then one addmm per column block, whose
        columns the CPU matmul computes exactly as in the official single addmm), so near-ties resolve the same way.
        On the CPU the columns go in blocks of `SEARCH_BLOCK` that stay in cache, keeping the first minimum across
        blocks as argmin does; other devices run the single addmm.
        """
        codebook_t = self.codebook[index].float().t()
        flat = residual.reshape(-1, self.code_dim)
        residual_sq = flat.pow(2.0).sum(dim=1, keepdim=True)
        block = SEARCH_BLOCK if flat.device.type == "cpu" else self.codebook_size
        best_distances = best_codes = None
        for start in range(0, self.codebook_size, block):
            columns = slice(start, start + block)
            distances = (residual_sq + codebook_norms[:, columns]).addmm_(flat, codebook_t[:, columns], alpha=-2.0)
            block_distances, block_codes = distances.min(dim=1)
            if best_codes is None:
                best_distances, best_codes = block_distances, block_codes
            else:
                closer = block_distances < best_distances  # strict: an equal distance keeps the earlier code
                best_distances = torch.where(closer, block_distances, best_distances)
                best_codes = torch.where(closer, block_codes + start, best_codes)
        return best_codes.reshape(residual.shape[:-1])

    @torch.no_grad()
    def _ema_update_after_all_depths(self, depth_residuals: list[torch.Tensor], depth_codes: list[torch.Tensor]):
        flat_residuals = [r.reshape(-1, self.code_dim) for r in depth_residuals]
        flat_codes = [c.reshape(-1) for c in depth_codes]
        if self.shared_codebook:
            # depth-major concatenation: all positions of depth 1, then depth 2, ...
            self._ema_update(0, torch.cat(flat_residuals), torch.cat(flat_codes))
        else:
            for d in range(self.depth):
                self._ema_update(d, flat_residuals[d], flat_codes[d])

    @torch.no_grad()
    def _ema_update(self, index: int, vectors: torch.Tensor, codes: torch.Tensor):
        """One EMA step of codebook `index` on `vectors` assigned to `codes`, then restart and rewrite (fp32 math)."""
        vectors = vectors.reshape(-1, self.code_dim).float()
        codes = codes.reshape(-1)
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        sums = vectors.new_zeros(self.codebook_size, self.code_dim).index_add_(0, codes, vectors)
        if self.ema_sum_clamp is not None:
            sums = sums.clamp(-self.ema_sum_clamp, self.ema_sum_clamp)
        if _is_distributed():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)

        cluster_size = self.cluster_size_ema[index].float().mul(self.ema_decay).add(counts, alpha=1 - self.ema_decay)
        embed_sum = self.embed_ema[index].float().mul(self.ema_decay).add(sums, alpha=1 - self.ema_decay)
        if self.restart_dead_codes:
            candidates = self._restart_candidates(vectors)
            dead = cluster_size < self.restart_threshold
            embed_sum = torch.where(dead[:, None], candidates, embed_sum)
            cluster_size = torch.where(dead, torch.ones_like(cluster_size), cluster_size)

        self.cluster_size_ema[index].copy_(cluster_size)
        self.embed_ema[index].copy_(embed_sum)
        self.codebook[index].copy_(self._smoothed_codebook(cluster_size, embed_sum))

    @torch.no_grad()
    def _restart_candidates(self, vectors: torch.Tensor) -> torch.Tensor:
        """K random batch vectors (tiled with small noise when the batch has fewer than K), rank 0's on all ranks."""
        num_vectors = vectors.shape[0]
        if num_vectors < self.codebook_size:
            # Same draws, shapes and order as the official `_tile_with_noise`, so seeded runs match it.
            repeats = (self.codebook_size + num_vectors - 1) // num_vectors
            noise_scale = vectors.new_ones(self.code_dim) * 0.01 / math.sqrt(self.code_dim)
            vectors = vectors.repeat(repeats, 1)
            vectors = vectors + torch.rand_like(vectors) * noise_scale
        candidates = vectors[torch.randperm(vectors.shape[0], device=vectors.device)][: self.codebook_size]
        if _is_distributed():
            candidates = candidates.contiguous()
            dist.broadcast(candidates, src=0)
        return candidates

    def _smoothed_codebook(self, cluster_size: torch.Tensor, embed_sum: torch.Tensor) -> torch.Tensor:
        # Laplace smoothing: ee / (n (cs + eps) / (n + K eps)), n = sum of cluster sizes.
        total = cluster_size.sum()
        smoothed_size = total * (cluster_size + self.eps) / (total + self.codebook_size * self.eps)
        return embed_sum / smoothed_size.reshape(-1, 1)


def code_histogram_statistics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row of a code histogram `(D, K)`: `"usage"` (fraction of the K codes that occur) and `"perplexity"` (exp of
    the entropy of the code distribution). Integer counts are computed in float32, float counts in their own dtype."""
    counts = counts if counts.is_floating_point() else counts.float()
    probabilities = counts / counts.sum(dim=-1, keepdim=True)
    return {
        "usage": (counts > 0).to(counts.dtype).mean(dim=-1),
        "perplexity": torch.special.entr(probabilities).sum(dim=-1).exp(),
    }


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
