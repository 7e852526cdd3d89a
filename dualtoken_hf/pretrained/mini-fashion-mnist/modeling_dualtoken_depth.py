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
"""Depth-transformer heads of the unified DualToken model (paper §3.3, eq. 5–8, after RQ-Transformer).

At an image position p the LLM hidden state h_p is not classified directly: a small causal transformer runs over
D slots, one per residual depth. Slot 1 reads h_p; slot d > 1 reads the sum of the embeddings of the codes already
chosen at depths < d (eq. 5). Slot d's output goes through its own classifier (one per depth) to give the logits of
the depth-d code. The pixel and the semantic branch each have one such head.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GradientCheckpointingLayer
from transformers.activations import ACT2FN

from .configuration_dualtoken import DualTokenDepthHeadConfig, DualTokenQuantizerConfig


class DepthSlotCache:
    """One depth layer's keys and values of the slots run so far, written into buffers preallocated for all D slots
    (no concatenation per slot). Allocated at the first update, when the batch size is known."""

    def __init__(self, depth: int):
        self.depth = depth
        self.length = 0
        self.keys = self.values = None

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new slots' `key` and `value` `(N, heads, S, head_dim)`; return those of every slot so far."""
        if self.keys is None:
            shape = (*key.shape[:2], self.depth, key.shape[-1])
            self.keys, self.values = key.new_empty(shape), value.new_empty(shape)
        end = self.length + key.shape[2]
        self.keys[:, :, self.length : end] = key
        self.values[:, :, self.length : end] = value
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class DualTokenDepthAttention(nn.Module):
    """Causal multi-head self-attention over depth slots, with an optional key/value cache.

    `DualTokenDepthHeadConfig` checks that `hidden_size` is a multiple of `num_heads`."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, cache: DepthSlotCache | None = None) -> torch.Tensor:
        """`hidden_states` `(N, S, W)`: S new slots. With `cache` (the slots before), S must be 1."""
        batch, slots, width = hidden_states.shape
        query, key, value = (
            self.qkv(hidden_states).view(batch, slots, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        if cache is not None:
            key, value = cache.update(key, value)
        # A single new slot sees every earlier slot; a block of slots without cache attends causally.
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=cache is None and slots > 1)
        return self.out(attended.transpose(1, 2).reshape(batch, slots, width))


class DualTokenDepthMLP(nn.Module):
    """The feed-forward half of a depth layer: `fc2(act(fc1(x)))`."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class DualTokenDepthLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: causal attention over slots, then an MLP."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, hidden_act: str, eps: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.attention = DualTokenDepthAttention(hidden_size, num_heads)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = DualTokenDepthMLP(hidden_size, intermediate_size, hidden_act)

    def forward(self, hidden_states, cache: DepthSlotCache | None = None):
        hidden_states = hidden_states + self.attention(self.attention_norm(hidden_states), cache)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class DualTokenDepthTransformer(nn.Module):
    """
    One depth head (pixel or semantic): `num_layers` causal layers over D slots and D classifiers.

    Args:
        config: the transformer (paper: 3 layers).
        input_size: width of the LLM hidden state h_p (slot 1 input).
        quantizer_config: the branch's quantizer, which gives the number of slots and classifiers (its depth D),
            the classes of each classifier (its codebook size K) and the width of the code embeddings that slots
            d > 1 read (its `code_dim`, eq. 5).
    """

    def __init__(self, config: DualTokenDepthHeadConfig, input_size: int, quantizer_config: DualTokenQuantizerConfig):
        super().__init__()
        width = config.hidden_size
        self.depth = quantizer_config.depth
        self.input_projection = nn.Linear(input_size, width)
        self.code_projection = nn.Linear(quantizer_config.code_dim, width)
        self.slot_embeddings = nn.Embedding(self.depth, width)
        self.layers = nn.ModuleList(
            DualTokenDepthLayer(
                width, config.num_attention_heads, config.intermediate_size, config.hidden_act, config.layer_norm_eps
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.classifiers = nn.ModuleList(nn.Linear(width, quantizer_config.codebook_size) for _ in range(self.depth))

    def _slot_input(self, slot: int, hidden_states=None, code_embedding_sum=None) -> torch.Tensor:
        """eq. 5: slot 1 reads h_p, slot d > 1 the sum of the code embeddings of depths < d; plus a slot embedding."""
        source = self.input_projection(hidden_states) if slot == 0 else self.code_projection(code_embedding_sum)
        return source + self.slot_embeddings.weight[slot]

    def _run_layers(self, slot_inputs: torch.Tensor, cache: list[DepthSlotCache] | None = None) -> torch.Tensor:
        hidden_states = slot_inputs
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, None if cache is None else cache[index])
        return self.norm(hidden_states)

    def forward(self, hidden_states: torch.Tensor, code_embeddings: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of all depths (training, eq. 8).

        Args:
            hidden_states: `(N, input_size)` LLM hidden states that predict N image positions.
            code_embeddings: `(N, D, code_dim)` embeddings of the target codes at each depth.

        Returns:
            `(N, D, codebook_size)` logits; slot d only sees the codes of depths < d.
        """
        prefix_sums = code_embeddings[:, :-1].cumsum(dim=1)
        slot_inputs = torch.cat(
            [self._slot_input(0, hidden_states=hidden_states)[:, None]]
            + [self._slot_input(d, code_embedding_sum=prefix_sums[:, d - 1])[:, None] for d in range(1, self.depth)],
            dim=1,
        )
        slot_outputs = self._run_layers(slot_inputs)
        return torch.stack([classifier(slot_outputs[:, d]) for d, classifier in enumerate(self.classifiers)], dim=1)

    @torch.no_grad()
    def sample(
        self,
        hidden_states: torch.Tensor,
        choose_codes: Callable[[int, torch.Tensor], torch.LongTensor],
        embed_codes: Callable[[torch.LongTensor, int], torch.Tensor],
        use_cache: bool = True,
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Choose the D codes of each row autoregressively over depth.

        Args:
            hidden_states: `(N, input_size)`.
            choose_codes: `(d, logits (N, K)) -> codes (N,)`; sampling, guidance and warping live there.
            embed_codes: `(codes (N,), d) -> (N, code_dim)` code embeddings of depth d.
            use_cache: keep keys/values of earlier slots (O(D) work); `False` recomputes all slots at every depth
                as the official RQ-Transformer head does (O(D^2)). Both give the same codes for the same seed.

        Returns:
            `(codes (N, D), embedding_sum (N, code_dim))`: the chosen codes and their embeddings summed over depth.
        """
        cache = [DepthSlotCache(self.depth) for _ in self.layers] if use_cache else None
        slot_inputs = [self._slot_input(0, hidden_states=hidden_states)]
        codes, embedding_sum = [], None
        for d in range(self.depth):
            if use_cache:
                slot_output = self._run_layers(slot_inputs[-1][:, None], cache)[:, -1]
            else:
                slot_output = self._run_layers(torch.stack(slot_inputs, dim=1))[:, -1]
            codes.append(choose_codes(d, self.classifiers[d](slot_output)))
            embedding = embed_codes(codes[-1], d)
            embedding_sum = embedding if embedding_sum is None else embedding_sum + embedding
            if d + 1 < self.depth:
                slot_inputs.append(self._slot_input(d + 1, code_embedding_sum=embedding_sum))
        return torch.stack(codes, dim=1), embedding_sum


__all__ = ["DualTokenDepthTransformer"]
