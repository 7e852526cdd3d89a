"""Codebook usage over a whole evaluation set, accumulated as per-depth code histograms."""

import torch

from ..quantization_dualtoken import DualTokenResidualQuantizer


class CodeHistogram:
    """Per-depth counts of a quantizer's codes over many batches.

    `statistics` gives the same numbers as `DualTokenResidualQuantizer.codebook_statistics` on all the codes at once,
    without keeping the codes.
    """

    def __init__(self, quantizer: DualTokenResidualQuantizer):
        self.quantizer = quantizer
        self.counts = torch.zeros(quantizer.depth, quantizer.codebook_size, dtype=torch.float64)

    def update(self, codes: torch.LongTensor):
        """Count a batch of codes `(B, h, w, D)`."""
        flat_codes = codes.detach().reshape(-1, self.quantizer.depth).cpu()
        for d in range(self.quantizer.depth):
            self.counts[d] += torch.bincount(flat_codes[:, d], minlength=self.quantizer.codebook_size).double()

    def statistics(self) -> dict[str, list[float]]:
        """Per depth: `usage` (fraction of the K codes seen), `perplexity` (exp of the entropy of the histogram) and
        `dead_codes` (codes whose EMA cluster size is below the restart threshold, from the quantizer's buffers)."""
        probabilities = self.counts / self.counts.sum(dim=1, keepdim=True)
        # Dead codes depend only on the quantizer's EMA buffers; any valid codes will do as the argument.
        device = self.quantizer.codebook.device
        placeholder_codes = torch.zeros(1, 1, 1, self.quantizer.depth, dtype=torch.long, device=device)
        dead_codes = self.quantizer.codebook_statistics(placeholder_codes)["dead_codes"]
        return {
            "usage": (self.counts > 0).double().mean(dim=1).tolist(),
            "perplexity": torch.special.entr(probabilities).sum(dim=1).exp().tolist(),
            "dead_codes": [int(count) for count in dead_codes.tolist()],
        }
