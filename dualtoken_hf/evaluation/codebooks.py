"""Codebook usage over a whole evaluation set, accumulated as per-depth code histograms."""

import torch

from ..quantization_dualtoken import DualTokenResidualQuantizer, code_histogram_statistics


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
        self.counts += self.quantizer.code_counts(codes.detach()).cpu().double()

    def statistics(self) -> dict[str, list[float]]:
        """Per depth: `usage` (fraction of the K codes seen), `perplexity` (exp of the entropy of the histogram) and
        `dead_codes` (codes whose EMA cluster size is below the restart threshold, from the quantizer's buffers)."""
        statistics = {name: values.tolist() for name, values in code_histogram_statistics(self.counts).items()}
        statistics["dead_codes"] = self.quantizer.dead_codes().tolist()
        return statistics
