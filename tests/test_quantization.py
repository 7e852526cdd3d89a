"""Tests of the residual quantizer against the official DualToken code (reference tensors) and its invariants."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import OfficialReference, require_reference_dir

from dualtoken_hf.configuration_dualtoken import DualTokenQuantizerConfig
from dualtoken_hf.quantization_dualtoken import DualTokenResidualQuantizer, ResidualQuantizerOutput


# Official quantizer settings per version and branch: (state-dict prefix, our config settings).
OFFICIAL_QUANTIZERS = {
    "v1": {
        "pixel": ("quantizer", {"ema_sum_clamp": 1000.0}),
        "semantic": ("quantizer_semantic", {"ema_sum_clamp": 1000.0}),
    },
    "v2": {
        "pixel": ("quantizer_pix", {"ema_sum_clamp": None}),
        "semantic": ("quantizer_sem", {"ema_sum_clamp": None, "ema_update_per_depth": False}),
    },
}
CASES = [(version, branch) for version in ("v1", "v2") for branch in ("pixel", "semantic")]


def make_quantizer(**settings) -> DualTokenResidualQuantizer:
    return DualTokenResidualQuantizer(DualTokenQuantizerConfig(**settings))


def load_official_quantizer(state: dict, prefix: str, **kwargs) -> DualTokenResidualQuantizer:
    """Build our quantizer from an official `RQBottleneck` state dict (shared codebook, `K + 1` rows, zero row K)."""
    depth = sum(1 for key in state if key.startswith(f"{prefix}.codebooks.") and key.endswith(".weight"))
    weight = state[f"{prefix}.codebooks.0.weight"]
    assert torch.all(weight[-1] == 0), "the official padding row is expected to be zero"
    quantizer = make_quantizer(codebook_size=weight.shape[0] - 1, code_dim=weight.shape[1], depth=depth, **kwargs)
    quantizer.load_state_dict(
        {
            "codebook": weight[None, :-1],
            "cluster_size_ema": state[f"{prefix}.codebooks.0.cluster_size_ema"][None],
            "embed_ema": state[f"{prefix}.codebooks.0.embed_ema"][None],
        }
    )
    return quantizer


@pytest.fixture(scope="module")
def reference():
    require_reference_dir()
    references = {version: OfficialReference(version) for version in ("v1", "v2")}
    return {version: (reference.state, reference.io) for version, reference in references.items()}


def _official_quantizers(reference, version, **semantic_overrides):
    state, _ = reference[version]
    quantizers = {}
    for branch, (prefix, kwargs) in OFFICIAL_QUANTIZERS[version].items():
        quantizers[branch] = load_official_quantizer(
            state, prefix, **kwargs, **(semantic_overrides if branch == "semantic" else {})
        )
    return quantizers


def _assert_buffers_equal_official(quantizer, io, name, atol=1e-6):
    torch.testing.assert_close(quantizer.codebook[0], io[f"{name}.weight"][:-1], rtol=0, atol=atol)
    torch.testing.assert_close(quantizer.cluster_size_ema[0], io[f"{name}.cluster_size_ema"], rtol=0, atol=atol)
    torch.testing.assert_close(quantizer.embed_ema[0], io[f"{name}.embed_ema"], rtol=0, atol=atol)


# --- against the official code ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version,branch", CASES)
def test_eval_forward_reproduces_official_codes_latents_and_loss(reference, version, branch):
    _, io = reference[version]
    quantizer = _official_quantizers(reference, version)[branch].eval()
    latents = io[f"encode.{branch}.quantizer_input"]

    with torch.no_grad():
        output = quantizer(latents)

    assert isinstance(output, ResidualQuantizerOutput)
    assert torch.equal(output.codes, io[f"encode.{branch}.codes"])
    torch.testing.assert_close(
        output.quantized_latents, io[f"encode.{branch}.latents_quantized"].reshape(latents.shape), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(output.commitment_loss, io[f"encode.{branch}.commitment_loss"][0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("version,branch", CASES)
def test_embed_codes_match_official_embeddings(reference, version, branch):
    _, io = reference[version]
    quantizer = _official_quantizers(reference, version)[branch]
    codes = io[f"encode.{branch}.codes"]

    torch.testing.assert_close(
        quantizer.embed_codes_per_depth(codes), io[f"codes.{branch}.embeddings_with_depth"], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        quantizer.embed_codes(codes), io[f"codes.{branch}.embeddings_summed"], rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_train_mode_reproduces_official_ema_updates_and_codes(reference, version):
    _, io = reference[version]
    quantizers = _official_quantizers(reference, version, official_ema_quirk=True)
    for quantizer in quantizers.values():
        quantizer.train()

    torch.manual_seed(0)  # official RNG order: pixel quantizer then semantic quantizer, two forwards
    for step in (1, 2):
        for branch, quantizer in quantizers.items():
            output = quantizer(io[f"encode.{branch}.quantizer_input"])
            assert torch.equal(output.codes, io[f"train.step{step}.{branch}.codes"]), (step, branch)
            torch.testing.assert_close(
                output.commitment_loss, io[f"train.step{step}.{branch}.commitment_loss"][0], rtol=1e-5, atol=0
            )
            _assert_buffers_equal_official(quantizer, io, f"ema.{branch}.after{step}")


def _hand_ema_update(cluster_size, embed_sum, vectors, codes, permutation, decay=0.99, eps=1e-5):
    """README §5.6 with the official one-hot formulation; N >= K here, so the restart draws only a permutation."""
    codebook_size = cluster_size.shape[0]
    one_hot = torch.nn.functional.one_hot(codes, codebook_size).T.float()
    cluster_size = decay * cluster_size + (1 - decay) * one_hot.sum(dim=1)
    embed_sum = decay * embed_sum + (1 - decay) * (one_hot @ vectors)
    dead = cluster_size < 1
    embed_sum[dead] = vectors[permutation][:codebook_size][dead]
    cluster_size[dead] = 1.0
    total = cluster_size.sum()
    weight = embed_sum / (total * (cluster_size + eps) / (total + codebook_size * eps))[:, None]
    return weight, cluster_size, embed_sum


def test_after_all_depths_update_pairs_codes_with_own_residual_unless_official_quirk(reference):
    _, io = reference["v2"]
    quantizers = _official_quantizers(reference, "v2")  # official_ema_quirk=False (default)
    for quantizer in quantizers.values():
        quantizer.train()
    torch.manual_seed(0)
    quantizers["pixel"](io["encode.pixel.quantizer_input"])  # consumes the pixel draws, as in the official run
    output = quantizers["semantic"](io["encode.semantic.quantizer_input"])

    # Hand computation from the recorded inputs: residual r_d = x - sum_{i<d} e_i, all depths on the unchanged table.
    latents, codes = io["encode.semantic.quantizer_input"], io["encode.semantic.codes"]
    table = io["ema.semantic.before.weight"]
    embeddings = table[codes]  # (B, h, w, D, C)
    residuals = [latents - embeddings[..., :d, :].sum(dim=-2) for d in range(codes.shape[-1])]
    final_residual = latents - embeddings.sum(dim=-2)
    flat_codes = torch.cat([codes[..., d].reshape(-1) for d in range(codes.shape[-1])])
    quirk_vectors = torch.cat([final_residual.reshape(-1, latents.shape[-1])] * codes.shape[-1])
    torch.testing.assert_close(quirk_vectors, io["train.step1.update.04.semantic.vectors"], rtol=0, atol=1e-6)
    assert torch.equal(flat_codes, io["train.step1.update.04.semantic.idxs"])

    own_vectors = torch.cat([r.reshape(-1, latents.shape[-1]) for r in residuals])
    weight, cluster_size, embed_sum = _hand_ema_update(
        io["ema.semantic.before.cluster_size_ema"].clone(),
        io["ema.semantic.before.embed_ema"].clone(),
        own_vectors,
        flat_codes,
        io["train.step1.rng.08.randperm"],
    )
    semantic = quantizers["semantic"]
    assert torch.equal(output.codes, codes)
    torch.testing.assert_close(semantic.codebook[0], weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(semantic.cluster_size_ema[0], cluster_size, rtol=0, atol=1e-6)
    torch.testing.assert_close(semantic.embed_ema[0], embed_sum, rtol=0, atol=1e-6)
    assert (semantic.embed_ema[0] - io["ema.semantic.after1.embed_ema"]).abs().max() > 1e-2


# --- invariants ------------------------------------------------------------------------------------------------


def test_gradient_is_straight_through_to_latents_and_never_reaches_codebook():
    torch.manual_seed(0)
    quantizer = make_quantizer(codebook_size=16, code_dim=4, depth=3).train()
    latents = torch.randn(2, 3, 3, 4, requires_grad=True)

    quantizer(latents).quantized_latents.sum().backward()

    assert torch.equal(latents.grad, torch.ones_like(latents))
    assert list(quantizer.parameters()) == []
    assert not quantizer.codebook.requires_grad and quantizer.codebook.grad is None


def test_commitment_loss_is_mean_over_depths_of_partial_sum_errors():
    torch.manual_seed(0)
    quantizer = make_quantizer(codebook_size=16, code_dim=4, depth=3).eval()
    latents = torch.randn(2, 3, 3, 4)

    output = quantizer(latents)

    partial_sums = quantizer.embed_codes_per_depth(output.codes).cumsum(dim=-2)
    expected = torch.stack([(latents - partial_sums[..., d, :]).pow(2).mean() for d in range(3)]).mean()
    torch.testing.assert_close(output.commitment_loss, expected)
    torch.testing.assert_close(output.quantized_latents, partial_sums[..., -1, :])


def test_ema_changes_buffers_only_in_training_mode():
    torch.manual_seed(0)
    quantizer = make_quantizer(codebook_size=16, code_dim=4, depth=2)
    initial = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    latents = torch.randn(2, 3, 3, 4)

    quantizer.eval()(latents)
    for name, buffer in quantizer.named_buffers():
        assert torch.equal(buffer, initial[name]), name

    quantizer.train()(latents)
    for name, buffer in quantizer.named_buffers():
        assert not torch.equal(buffer, initial[name]), name


def test_dead_codes_are_restarted_from_batch_vectors_with_cluster_size_one():
    torch.manual_seed(0)
    quantizer = make_quantizer(codebook_size=8, code_dim=4, depth=1).train()
    eye = torch.eye(4) * 10
    quantizer.codebook[0] = torch.cat([eye, -eye])
    quantizer.embed_ema[0] = quantizer.codebook[0]
    # cluster size 1 everywhere: after one decay step exactly the codes without hits fall below the threshold 1
    quantizer.cluster_size_ema.fill_(1.0)
    latents = torch.cat([eye[0] + 0.1 * torch.randn(8, 4), eye[1] + 0.1 * torch.randn(8, 4)]).reshape(2, 2, 4, 4)
    initial_embed_ema = quantizer.embed_ema[0].clone()

    output = quantizer(latents)

    assert set(output.codes.unique().tolist()) == {0, 1}
    flat = latents.reshape(-1, 4)
    torch.testing.assert_close(quantizer.cluster_size_ema[0, :2], torch.full((2,), 0.99 + 0.01 * 8))
    torch.testing.assert_close(
        quantizer.embed_ema[0, :2], 0.99 * initial_embed_ema[:2] + 0.01 * flat.reshape(2, 8, 4).sum(dim=1)
    )
    assert torch.equal(quantizer.cluster_size_ema[0, 2:], torch.ones(6))
    for row in quantizer.embed_ema[0, 2:]:  # N >= K, so candidates are exact batch vectors (no noise)
        assert (flat == row).all(dim=1).any()
    assert ((quantizer.codebook[0, 2:] - initial_embed_ema[2:]).abs().amax(dim=1) > 1).all()


@pytest.mark.parametrize("settings, expected_sum", [({}, 1000.0), ({"ema_sum_clamp": None}, 2400.0)])
def test_ema_sums_are_clamped_at_the_config_default_unless_disabled(settings, expected_sum):
    """The config's default clamp (1000, the paper's) is the one the quantizer applies; `None` switches it off."""
    quantizer = make_quantizer(codebook_size=2, code_dim=2, depth=1, restart_dead_codes=False, **settings).train()
    quantizer.codebook[0] = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    quantizer.embed_ema[0] = quantizer.codebook[0]
    latents = torch.full((1, 2, 2, 2), 600.0)  # four vectors on code 0: a batch sum of 2400 per channel

    quantizer(latents)

    torch.testing.assert_close(quantizer.embed_ema[0, 0], torch.full((2,), 0.99 * 1.0 + 0.01 * expected_sum))


def test_codebook_is_one_tensor_when_shared_and_one_per_depth_otherwise():
    shared = make_quantizer(codebook_size=16, code_dim=4, depth=3, shared_codebook=True)
    unshared = make_quantizer(codebook_size=16, code_dim=4, depth=3, shared_codebook=False)

    assert shared.codebook.shape == (1, 16, 4) and shared.embed_ema.shape == (1, 16, 4)
    assert shared.cluster_size_ema.shape == (1, 16)
    assert unshared.codebook.shape == (3, 16, 4) and unshared.cluster_size_ema.shape == (3, 16)
    assert set(shared.state_dict()) == {"codebook", "cluster_size_ema", "embed_ema"}


def test_reset_parameters_gives_standard_normal_codebook_and_matching_ema():
    torch.manual_seed(0)
    quantizer = make_quantizer(codebook_size=512, code_dim=8, depth=2)
    quantizer.cluster_size_ema.fill_(3.0)

    quantizer.reset_parameters()

    assert abs(quantizer.codebook.mean().item()) < 0.05 and abs(quantizer.codebook.std().item() - 1) < 0.05
    assert torch.equal(quantizer.embed_ema, quantizer.codebook)
    assert torch.equal(quantizer.cluster_size_ema, torch.zeros(1, 512))


def test_search_under_bf16_autocast_gives_fp32_codes():
    torch.manual_seed(0)
    quantizer = make_quantizer(codebook_size=256, code_dim=8, depth=4).eval()
    latents = torch.randn(2, 8, 8, 8)
    fp32_output = quantizer(latents)
    # precondition: a bf16 search would pick other codes at depth 1, so the test can tell the difference
    codebook_t = quantizer.codebook[0].t()
    flat = latents.reshape(-1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_distances = torch.addmm(flat.pow(2).sum(1, keepdim=True) + codebook_t.pow(2).sum(0), flat, codebook_t)
    assert bf16_distances.dtype == torch.bfloat16
    assert (bf16_distances.argmin(-1) != fp32_output.codes[..., 0].reshape(-1)).any()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_output = quantizer(latents)

    assert torch.equal(autocast_output.codes, fp32_output.codes)
    assert autocast_output.quantized_latents.dtype == torch.float32
    torch.testing.assert_close(autocast_output.quantized_latents, fp32_output.quantized_latents, rtol=0, atol=0)


def test_bf16_latents_are_searched_in_fp32_and_returned_in_bf16():
    torch.manual_seed(0)
    quantizer = make_quantizer(codebook_size=64, code_dim=8, depth=4).eval()
    latents = torch.randn(2, 4, 4, 8).bfloat16()

    output = quantizer(latents)

    assert torch.equal(output.codes, quantizer(latents.float()).codes)
    assert output.quantized_latents.dtype == torch.bfloat16 and output.commitment_loss.dtype == torch.bfloat16


def test_codebook_statistics_report_usage_perplexity_and_dead_codes():
    quantizer = make_quantizer(codebook_size=4, code_dim=2, depth=2)
    quantizer.cluster_size_ema[0] = torch.tensor([0.0, 1.0, 2.0, 0.5])
    codes = torch.stack([torch.zeros(8, dtype=torch.long), torch.arange(8) % 4], dim=-1).reshape(2, 2, 2, 2)

    statistics = quantizer.codebook_statistics(codes)

    torch.testing.assert_close(statistics["usage"], torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(statistics["perplexity"], torch.tensor([1.0, 4.0]))
    assert statistics["dead_codes"].tolist() == [2, 2]


@pytest.mark.parametrize(
    "method,shape,match",
    [
        ("forward", (2, 16, 8), r"latents must have shape \(batch_size, height, width, 8\), got \(2, 16, 8\)"),
        ("forward", (2, 4, 4, 16), r"got \(2, 4, 4, 16\)"),
        ("embed_codes", (2, 4, 4, 3), r"codes must have shape \(batch_size, height, width, 4\), got \(2, 4, 4, 3\)"),
    ],
)
def test_wrong_shapes_raise_value_error(method, shape, match):
    quantizer = make_quantizer(codebook_size=64, code_dim=8, depth=4)
    tensor = torch.zeros(shape) if method == "forward" else torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        getattr(quantizer, method)(tensor)


@pytest.mark.parametrize(
    "bad_code,match", [(64, r"in \[0, 64\), got min 0 and max 64"), (-1, r"got min -1 and max 0")]
)
def test_out_of_range_codes_raise_value_error(bad_code, match):
    quantizer = make_quantizer(codebook_size=64, code_dim=8, depth=4)
    codes = torch.zeros(1, 2, 2, 4, dtype=torch.long)
    codes[0, 1, 1, 2] = bad_code
    with pytest.raises(ValueError, match=match):
        quantizer.embed_codes(codes)


# --- torch.distributed -----------------------------------------------------------------------------------------


def _distributed_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # identical initial codebooks on every rank
        quantizers = [
            make_quantizer(codebook_size=16, code_dim=4, depth=3).train(),
            make_quantizer(
                codebook_size=16, code_dim=4, depth=3, shared_codebook=False, ema_update_per_depth=False
            ).train(),
        ]
        torch.manual_seed(100 + rank)  # different data and different local restart draws on each rank
        for _ in range(3):
            latents = torch.randn(rank + 1, 3, 3, 4)  # N = 9 (< K, tiled with noise) on rank 0, 18 on rank 1
            for quantizer in quantizers:
                quantizer(latents)
        state = {f"{i}.{name}": t for i, q in enumerate(quantizers) for name, t in q.state_dict().items()}
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_training_keeps_codebooks_identical_on_all_ranks(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)

    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (rank0["0.cluster_size_ema"] > 0).all() and (rank0["1.cluster_size_ema"] > 0).all()
