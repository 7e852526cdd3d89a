"""Projections and pixel decoder against the official tiny reference runs (see /work/shared/reference/README.md)."""

import pytest
import torch

from conftest import REFERENCE_DIR, OfficialReference
from dualtoken_hf.convert.official_keys import convert_official_decoder, convert_official_projection
from dualtoken_hf.modeling_dualtoken_decoder import DualTokenPixelDecoder, resize_latent_grid
from dualtoken_hf.modeling_dualtoken_projection import (
    DualTokenAttentionProjection,
    DualTokenConvProjection,
    build_projection,
)


FULL_SIZE = {
    # version: (projection_type, latent_channels, official post-projection group)
    "v1": ("resconv", 256, "postquant_visual"),
    "v2": ("attention", 32, "postquant_pix"),
}
FULL_SIZE_DECODER = {
    "hidden_size": 1152,
    "sample_size": 384,
    "decoder_in_channels": 1024,
    "block_out_channels": (128, 128, 512, 512, 1024),
    "layers_per_block": 2,
}

requires_reference = pytest.mark.usefixtures("reference_dir")  # fails without the golden tensors (conftest)


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rtol * scale, f"max abs error {error:.3g} exceeds {rtol} × max |expected| {scale:.3g}"


def assert_close_absolute(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    assert error <= atol, f"max abs error {error:.3g} exceeds {atol}"


class Reference(OfficialReference):
    @property
    def config(self) -> dict:
        return self.official_config

    @property
    def code_width(self) -> int:
        return self.config["vq_pix"]["embed_dim"] if self.version == "v2" else self.config["embed_dim"]

    @property
    def projection_type(self) -> str:
        return "attention" if self.version == "v2" else "resconv"

    def decoder(self) -> DualTokenPixelDecoder:
        ddconfig = self.config["ddconfig"]
        model = DualTokenPixelDecoder(
            latent_channels=self.code_width,
            hidden_size=self.config["hidden_size"],
            projection_type=self.projection_type,
            sample_size=ddconfig["resolution"],
            decoder_in_channels=ddconfig["decoder_in_channels"],
            block_out_channels=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
            layers_per_block=ddconfig["num_res_blocks"],
            out_channels=ddconfig["out_ch"],
        )
        weights = convert_official_decoder(
            self.state, self.version, num_levels=len(ddconfig["ch_mult"]), layers_per_block=ddconfig["num_res_blocks"]
        )
        model.load_state_dict(weights, strict=True)
        return model.eval()

    def projection(self, official_prefix: str, in_dim: int, out_dim: int, causal: bool) -> torch.nn.Module:
        module = build_projection(self.projection_type, in_dim, out_dim, causal=causal)
        module.load_state_dict(convert_official_projection(self.state, official_prefix, self.projection_type))
        return module.eval()

    def pixel_latents(self) -> torch.Tensor:
        latents = self.io["encode.pixel.latents_quantized"]
        return latents.reshape(latents.shape[0], 4, 4, self.code_width)


@pytest.fixture(scope="module")
def reference_v1() -> Reference:
    return Reference("v1")


@pytest.fixture(scope="module")
def reference_v2() -> Reference:
    return Reference("v2")


@pytest.fixture(scope="module", params=["v1", "v2"])
def reference(request) -> Reference:
    return request.getfixturevalue(f"reference_{request.param}")


def as_grid(tokens: torch.Tensor) -> torch.Tensor:
    batch_size, num_positions, channels = tokens.shape
    side = int(num_positions**0.5)
    return tokens.reshape(batch_size, side, side, channels)


# --------------------------------------------------------------------------------------------- projections


@requires_reference
@pytest.mark.parametrize(
    "official_prefix, input_name, expected_name, down, causal",
    [
        ("prequant_pix", "encode.hidden_states.2", "encode.pixel.projection_out", True, False),
        ("prequant_shortcut", "encode.hidden_states.1", "encode.pixel.shortcut_projection_out", True, False),
        ("prequant_sem", "encode.hidden_states.4", "encode.semantic.projection_out", True, False),
        (
            "postquant_sem",
            "encode.semantic.latents_quantized",
            "encode.semantic.features_post_projection",
            False,
            True,
        ),
    ],
)
def test_attention_projection_reproduces_official_v2(
    reference_v2, official_prefix, input_name, expected_name, down, causal
):
    hidden, code = reference_v2.config["hidden_size"], reference_v2.code_width
    in_dim, out_dim = (hidden, code) if down else (code, hidden)
    projection = reference_v2.projection(official_prefix, in_dim, out_dim, causal=causal)
    assert isinstance(projection, DualTokenAttentionProjection)
    inputs = reference_v2.io[input_name]
    grid = inputs if inputs.ndim == 4 else as_grid(inputs)
    with torch.no_grad():
        output = projection(grid)
    expected = reference_v2.io[expected_name]
    assert_close_relative(output.reshape(expected.shape), expected)


@requires_reference
def test_causal_attention_projection_ignores_later_positions(reference_v2):
    projection = reference_v2.projection("postquant_sem", reference_v2.code_width, 64, causal=True)
    grid = reference_v2.io["encode.semantic.latents_quantized"]
    changed = grid.clone()
    # Perturb every position from raster index 8 on (not by a constant: the input LayerNorms would remove it).
    changed[:, 2:, :, :] += torch.randn(changed[:, 2:].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = projection(grid).flatten(1, 2), projection(changed).flatten(1, 2)
    torch.testing.assert_close(after[:, :8], before[:, :8], rtol=0, atol=1e-6)
    assert (after[:, 8:] - before[:, 8:]).abs().max() > 1e-2


@requires_reference
@pytest.mark.parametrize(
    "official_prefix, input_name, expected_name, down",
    [
        ("prequant_visual", "encode.hidden_states.2", "encode.pixel.projection_out_nchw", True),
        ("prequant_semantic", "encode.hidden_states.4", "encode.semantic.projection_out_nchw", True),
        (
            "postquant_semantic",
            "encode.semantic.latents_quantized",
            "encode.semantic.features_post_projection_nchw",
            False,
        ),
        ("postquant_visual", "encode.pixel.latents_quantized", "decode.postquant_out_nchw", False),
    ],
)
def test_conv_projection_reproduces_official_v1(reference_v1, official_prefix, input_name, expected_name, down):
    hidden, code = reference_v1.config["hidden_size"], reference_v1.code_width
    in_dim, out_dim = (hidden, code) if down else (code, hidden)
    projection = reference_v1.projection(official_prefix, in_dim, out_dim, causal=False)
    assert isinstance(projection, DualTokenConvProjection)
    inputs = reference_v1.io[input_name]
    grid = inputs if inputs.ndim == 4 else as_grid(inputs)
    with torch.no_grad():
        output = projection(grid)
    assert_close_relative(output.permute(0, 3, 1, 2), reference_v1.io[expected_name])


def test_conv_projection_uses_pointwise_first_conv():
    projection = DualTokenConvProjection(64, 32)
    assert projection.conv1.kernel_size == (1, 1)
    assert projection.conv2.kernel_size == (3, 3)
    assert projection.conv_shortcut.kernel_size == (1, 1)


# ------------------------------------------------------------------------------------------------- decoder


@requires_reference
def test_decoder_intermediates_match_official(reference):
    decoder = reference.decoder()
    captured = {}
    hooks = [
        decoder.post_projection.register_forward_hook(lambda m, i, o: captured.__setitem__("postquant_out", o)),
        decoder.post_quant_conv.register_forward_hook(
            lambda m, i, o: captured.update(resized=i[0], post_quant_conv_out=o)
        ),
        decoder.decoder.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__("decoder_mid_out", o)),
    ]
    with torch.no_grad():
        decoder(reference.pixel_latents())
    for hook in hooks:
        hook.remove()

    io = reference.io
    if reference.version == "v2":
        assert_close_absolute(captured["postquant_out"].flatten(1, 2), io["decode.postquant_out"])
    else:
        assert_close_absolute(captured["postquant_out"].permute(0, 3, 1, 2), io["decode.postquant_out_nchw"])
    for name in ("resized", "post_quant_conv_out", "decoder_mid_out"):
        assert_close_absolute(captured[name], io[f"decode.{name}"])


@requires_reference
def test_decoder_reconstructs_official_images(reference):
    with torch.no_grad():
        images = reference.decoder()(reference.pixel_latents()).sample
    assert_close_absolute(images, reference.io["decode.images"])


@requires_reference
def test_decoder_decodes_summed_code_embeddings_like_official(reference):
    with torch.no_grad():
        images = reference.decoder()(reference.io["codes.pixel.embeddings_summed"]).sample
    assert_close_absolute(images, reference.io["codes.pixel.decoded_images"])


@requires_reference
def test_resize_reproduces_official_downsampling_probe(reference):
    resized = resize_latent_grid(reference.io["probe.bilinear_27_to_24.in"], 24)
    assert_close_absolute(resized, reference.io["probe.bilinear_27_to_24.out"], atol=1e-6)


def test_resize_keeps_grid_of_target_size():
    grid = torch.randn(1, 2, 5, 5)
    assert resize_latent_grid(grid, 5) is grid


@requires_reference
def test_decoder_save_and_load_is_bit_identical(reference_v2, tmp_path):
    decoder = reference_v2.decoder()
    latents = reference_v2.pixel_latents()
    decoder.save_pretrained(tmp_path / "pixel_decoder")
    reloaded = DualTokenPixelDecoder.from_pretrained(tmp_path / "pixel_decoder").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(latents).sample, decoder(latents).sample)


@requires_reference
def test_decoder_loads_from_subfolder(reference_v1, tmp_path):
    decoder = reference_v1.decoder()
    latents = reference_v1.pixel_latents()
    decoder.save_pretrained(tmp_path / "pixel_decoder")
    reloaded = DualTokenPixelDecoder.from_pretrained(tmp_path, subfolder="pixel_decoder").eval()
    assert reloaded.config.projection_type == "resconv"
    with torch.no_grad():
        assert torch.equal(reloaded(latents).sample, decoder(latents).sample)


def small_decoder() -> DualTokenPixelDecoder:
    return DualTokenPixelDecoder(
        latent_channels=8,
        hidden_size=64,
        projection_type="attention",
        sample_size=16,
        decoder_in_channels=32,
        block_out_channels=(32, 32),
        layers_per_block=1,
    )


def test_gradient_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    decoder = small_decoder()
    latents = torch.randn(1, 4, 4, 8)
    decoder(latents).sample.square().mean().backward()
    expected_grad = decoder.post_quant_conv.conv1.weight.grad.clone()
    decoder.zero_grad()
    decoder.enable_gradient_checkpointing()
    assert decoder.decoder.gradient_checkpointing
    decoder(latents).sample.square().mean().backward()
    torch.testing.assert_close(decoder.post_quant_conv.conv1.weight.grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "shape, message",
    [((2, 16, 8), r"\(2, 16, 8\)"), ((2, 4, 4, 7), r"\(2, 4, 4, 7\)")],
    ids=["flat tokens", "wrong channels"],
)
def test_decoder_rejects_malformed_latents(shape, message):
    decoder = small_decoder()
    with pytest.raises(ValueError, match=message):
        decoder(torch.zeros(shape))


def test_decoder_defaults_to_attention_at_lowest_resolution_only():
    decoder = DualTokenPixelDecoder(
        latent_channels=8,
        hidden_size=64,
        projection_type="attention",
        sample_size=16,
        decoder_in_channels=32,
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
    )
    assert decoder.config.up_block_types == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D")
    assert decoder.latent_size == 4


# ------------------------------------------------------------------------------------------ full-size keys


def official_rows(version: str, groups: set[str]) -> list[dict[str, str]]:
    path = REFERENCE_DIR / f"official_keys_fullsize_{version}.tsv"
    lines = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines(True) if not line.startswith("#")]
    header = lines[0]
    return [row for row in (dict(zip(header, line)) for line in lines[1:]) if row["group"] in groups]


def full_size_decoder(version: str) -> DualTokenPixelDecoder:
    projection_type, latent_channels, _ = FULL_SIZE[version]
    with torch.device("meta"):
        return DualTokenPixelDecoder(
            latent_channels=latent_channels, projection_type=projection_type, **FULL_SIZE_DECODER
        )


@requires_reference
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_decoder_has_official_parameter_count(version):
    rows = official_rows(version, {"decoder", "post_quant_conv", FULL_SIZE[version][2]})
    # v2's zero_k_bias is a buffer officially and is not stored here at all.
    official = sum(int(row["numel"]) for row in rows if row["kind"] == "param")
    assert sum(p.numel() for p in full_size_decoder(version).parameters()) == official


@requires_reference
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_official_keys_convert_onto_decoder(version):
    rows = official_rows(version, {"decoder", "post_quant_conv", FULL_SIZE[version][2]})
    with torch.device("meta"):
        official = {row["key"]: torch.empty([int(s) for s in row["shape"].split("x")]) for row in rows}
    converted = convert_official_decoder(official, version, num_levels=5, layers_per_block=2)
    expected = full_size_decoder(version).state_dict()
    assert set(converted) == set(expected)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


@requires_reference
def test_decoder_conversion_names_missing_official_keys(reference_v2):
    state = dict(reference_v2.state)
    del state["decoder.up.0.block.1.conv2.weight"]
    with pytest.raises(KeyError, match="decoder.up.0.block.1.conv2.weight"):
        convert_official_decoder(state, "v2", num_levels=4, layers_per_block=2)


@requires_reference
def test_projection_conversion_drops_zero_key_bias(reference_v2):
    converted = convert_official_projection(reference_v2.state, "prequant_pix", "attention")
    assert "attn.zero_k_bias" not in converted
    assert set(converted) == set(build_projection("attention", 64, 8).state_dict())
