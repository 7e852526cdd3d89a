"""The check that replicated state is identical on all processes (single-process parts; the 2-process DDP run in
test_train_tokenizer.py uses it on the codebooks and the discriminator, whose gradients `average_gradients` syncs)."""

import types

import torch

from dualtoken_hf.training import fingerprints, out_of_sync


def test_fingerprints_tell_equal_from_changed_or_permuted_tensors():
    tensor = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(fingerprints({"a": tensor}), fingerprints({"a": tensor.clone()}))
    assert not torch.equal(fingerprints({"a": tensor}), fingerprints({"a": tensor.flip(0)}))
    changed = tensor.clone()
    changed[1, 2] += 1e-6
    assert not torch.equal(fingerprints({"a": tensor}), fingerprints({"a": changed}))


def test_out_of_sync_names_the_tensors_that_differ_between_processes():
    state = {"pixel_quantizer.codebook": torch.ones(4), "semantic_quantizer.codebook": torch.zeros(4)}
    other_rank = fingerprints(state).clone()
    other_rank[1] += 1.0

    def gather(values):  # what accelerator.gather returns with a second process holding `other_rank`
        return torch.cat([values, other_rank[None]])

    assert out_of_sync(types.SimpleNamespace(gather=gather), state) == ["semantic_quantizer.codebook"]
    assert out_of_sync(types.SimpleNamespace(gather=lambda values: torch.cat([values, values])), state) == []
