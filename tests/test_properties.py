"""Property-based tests (hypothesis): the image processor, the residual quantizer and the processor's prompt expansion
hold their invariants on random shapes, dtypes, value ranges and text, or fail with a `ValueError`.

Arrays are drawn as a seed plus a shape, dtype and value range, then filled by NumPy: hypothesis explores the
parameters, NumPy makes the bytes, which keeps each example cheap.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dualtoken_hf.configuration_dualtoken import DualTokenQuantizerConfig
from dualtoken_hf.image_processing_dualtoken import DualTokenImageProcessor
from dualtoken_hf.quantization_dualtoken import DualTokenResidualQuantizer
from dualtoken_hf.testing import build_tiny_processor


CROP = 64  # the tiny preset's image size
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def image_processor():
    return DualTokenImageProcessor.from_preset("tiny")


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


# --- image processor --------------------------------------------------------------------------------------------

DTYPES = ["uint8", "int16", "int32", "int64", "bool", "float16", "float32", "float64"]


@st.composite
def random_arrays(draw):
    """Any 2-D to 4-D array: sizes 1..300 (down to 1x1, up to very thin), 1..5 channels on either side, any of
    `DTYPES`, values inside or outside the documented range, sometimes with NaN or inf."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ndim = draw(st.sampled_from([2, 3, 3, 3, 4]))
    height, width = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    channels = draw(st.integers(1, 5))
    shape = {
        2: (height, width),
        3: draw(st.sampled_from([(height, width, channels), (channels, height, width)])),
        4: (draw(st.integers(1, 3)), channels, height, width),
    }[ndim]
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    low, high = draw(st.sampled_from([(0.0, 1.0), (0.0, 255.0), (-1.0, 1.0), (0.0, 65535.0), (-1e6, 1e6)]))
    values = rng.uniform(low, high, size=shape)
    if dtype.kind == "f" and draw(st.booleans()) and values.size:
        values.flat[rng.integers(values.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if dtype.kind == "b":
        return values > (low + high) / 2
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    return np.clip(values, info.min, info.max).astype(dtype)  # NaN and inf pass the clip


def _as_input(array: np.ndarray, as_tensor: bool):
    if not as_tensor:
        return array
    if array.dtype == np.uint8 or array.dtype.kind != "u":
        return torch.from_numpy(np.ascontiguousarray(array))
    return array  # torch has no unsigned 16/32/64-bit images worth testing here


@FAST
@given(array=random_arrays(), as_tensor=st.booleans())
def test_image_processor_gives_unit_range_crops_or_a_value_error(image_processor, array, as_tensor):
    try:
        pixel_values = image_processor(_as_input(array, as_tensor), return_tensors="pt").pixel_values
    except ValueError:
        return
    num_images = array.shape[0] if array.ndim == 4 else 1
    assert pixel_values.shape == (num_images, 3, CROP, CROP)
    assert pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0


@st.composite
def constant_in_range_images(draw):
    """A constant image inside the documented range (0..255 integers, booleans, finite floats in [0, 1]), in any
    layout: (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels."""
    height, width = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    channels = draw(st.sampled_from([1, 3, 4]))
    shape = draw(st.sampled_from([(height, width), (height, width, channels), (channels, height, width)]))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if dtype.kind == "b":
        value = draw(st.booleans())
    elif dtype.kind in "iu":
        value = draw(st.integers(0, 255))
    else:
        value = draw(st.floats(0.0, 1.0, width=16 if dtype == np.float16 else 32))
    return np.full(shape, value, dtype=dtype)


@FAST
@given(image=constant_in_range_images())
def test_image_processor_accepts_every_in_range_image_and_keeps_a_constant_image_constant(image_processor, image):
    pixel_values = image_processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, CROP, CROP)
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    spread = pixel_values.amax(dim=(2, 3)) - pixel_values.amin(dim=(2, 3))
    assert spread.max() <= 1e-4


PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK", "YCbCr"]


@FAST
@given(mode=st.sampled_from(PIL_MODES), width=st.integers(1, 200), height=st.integers(1, 200), seed=st.integers(0, 99))
def test_pil_images_of_every_mode_and_size_give_unit_range_crops(image_processor, mode, width, height, seed):
    gray = np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)
    if mode in ("I;16", "I"):  # 16-bit grayscale, read as 0..65535
        image = PIL.Image.fromarray(gray.astype(np.uint16) * 257).convert(mode)
    elif mode == "F":  # float grayscale, read as [0, 1]
        image = PIL.Image.fromarray(gray.astype(np.float32) / 255)
    else:
        image = PIL.Image.fromarray(np.stack([gray, gray[::-1], 255 - gray], axis=-1)).convert(mode)
    pixel_values = image_processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, CROP, CROP)
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0


# --- quantizer --------------------------------------------------------------------------------------------------


@st.composite
def quantizer_cases(draw):
    config = DualTokenQuantizerConfig(
        codebook_size=draw(st.integers(1, 64)),
        code_dim=draw(st.integers(1, 8)),
        depth=draw(st.integers(1, 4)),
        shared_codebook=draw(st.booleans()),
        ema_update_per_depth=draw(st.booleans()),
        ema_sum_clamp=draw(st.sampled_from([None, 1000.0])),
    )
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5)), config.code_dim)
    scale = draw(st.sampled_from([1e-4, 1.0, 30.0, 1e3]))
    return config, shape, scale, draw(st.integers(0, 2**31 - 1)), draw(st.booleans())


@FAST
@given(case=quantizer_cases())
def test_quantizer_codes_are_in_range_and_commitment_loss_is_non_negative_in_training_and_eval(case):
    config, shape, scale, seed, training = case
    torch.manual_seed(seed)
    output = DualTokenResidualQuantizer(config).train(training)(torch.randn(shape) * scale)
    assert output.codes.shape == (*shape[:3], config.depth) and output.codes.dtype == torch.long
    assert output.codes.min() >= 0 and output.codes.max() < config.codebook_size
    assert torch.isfinite(output.commitment_loss) and output.commitment_loss >= 0


@FAST
@given(case=quantizer_cases())
def test_quantizer_output_is_the_sum_of_the_embeddings_of_its_codes(case):
    # In eval mode; a training forward rewrites the table by EMA while it searches (per depth or after all depths).
    config, shape, scale, seed, _ = case
    torch.manual_seed(seed)
    quantizer = DualTokenResidualQuantizer(config).eval()
    output = quantizer(torch.randn(shape) * scale)
    torch.testing.assert_close(
        quantizer.embed_codes(output.codes), output.quantized_latents, atol=1e-5 * max(1.0, scale), rtol=1e-5
    )


@FAST
@given(case=quantizer_cases())
def test_quantizer_commitment_loss_is_the_mean_squared_distance_to_the_partial_sums(case):
    config, shape, scale, seed, _ = case
    torch.manual_seed(seed)
    quantizer = DualTokenResidualQuantizer(config).eval()
    latents = torch.randn(shape) * scale
    output = quantizer(latents)
    partial_sums = quantizer.embed_codes_per_depth(output.codes).cumsum(dim=-2)
    expected = (latents[..., None, :] - partial_sums).pow(2).mean(dim=(0, 1, 2, 4)).mean()
    torch.testing.assert_close(output.commitment_loss, expected, atol=1e-6 * max(1.0, scale) ** 2, rtol=1e-4)


# --- processor prompt expansion ---------------------------------------------------------------------------------

IMAGE_MARKERS = ("<image>", "<begin_of_image>", "<end_of_image>")
# Any unicode except surrogates (which no UTF-8 text holds), with the image markers' own spellings taken out.
prompt_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40).filter(
    lambda text: not any(marker in text for marker in IMAGE_MARKERS)
)


@st.composite
def prompts_with_placeholders(draw):
    """1-3 prompts of unicode pieces (empty ones too; now and then one of several thousand characters) with 0-2
    image placeholders at random places, and the number of placeholders of each prompt."""
    prompts = []
    for _ in range(draw(st.integers(1, 3))):
        pieces = draw(st.lists(prompt_text, min_size=1, max_size=3))
        if draw(st.integers(0, 9)) == 0:
            pieces[0] = "a long prompt ünïcödé 🦊 " * 300
        pieces += ["<image>"] * draw(st.integers(0, 2))
        prompts.append("".join(draw(st.permutations(pieces))))
    # joined pieces may spell a marker across a boundary: a placeholder is then counted as one, others are avoided
    assume(not any(marker in prompt for prompt in prompts for marker in IMAGE_MARKERS[1:]))
    return prompts, [prompt.count("<image>") for prompt in prompts]


@FAST
@given(case=prompts_with_placeholders(), per_prompt=st.booleans())
def test_every_placeholder_expands_to_one_image_of_grid_positions(processor, case, per_prompt):
    prompts, counts = case
    images = [PIL.Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(sum(counts))] or None
    if per_prompt and images:
        ends = np.cumsum(counts).tolist()
        images = [images[end - count : end] for end, count in zip(ends, counts)]
    inputs = processor(text=prompts, images=images, return_tensors="pt")
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for row, count in enumerate(counts):
        ids = input_ids[row][mask[row]]
        assert (ids == processor.image_token_id).sum() == count * processor.num_image_tokens
        assert (ids == processor.boi_token_id).sum() == (ids == processor.eoi_token_id).sum() == count
        # each image is one unbroken run: begin, the grid's placeholders, end
        starts = (ids == processor.boi_token_id).nonzero().flatten().tolist()
        for start in starts:
            run = ids[start + 1 : start + 1 + processor.num_image_tokens]
            assert (run == processor.image_token_id).all() and ids[start + 1 + len(run)] == processor.eoi_token_id
    if images is not None:
        assert inputs["pixel_values"].shape == (sum(counts), 3, CROP, CROP)


@FAST
@given(case=prompts_with_placeholders(), offset=st.sampled_from([-1, 1, 2]))
def test_a_placeholder_count_that_differs_from_the_images_raises(processor, case, offset):
    prompts, counts = case
    if sum(counts) == 0:
        prompts = [prompts[0] + "<image>", *prompts[1:]]
        counts = [counts[0] + 1, *counts[1:]]
    num_images = sum(counts) + offset
    images = [PIL.Image.new("RGB", (8, 8))] * num_images or None
    with pytest.raises(ValueError, match=rf"{sum(counts)} <image> placeholder\(s\) but {num_images} image\(s\)"):
        processor(text=prompts, images=images)


@FAST
@given(case=prompts_with_placeholders(), data=st.data())
def test_images_given_per_prompt_must_match_the_placeholders_of_their_own_prompt(processor, case, data):
    prompts, counts = case
    assume(len(prompts) >= 2 and sum(counts) >= 1)
    # the same total number of images, one moved from a prompt that has placeholders to another prompt
    source = data.draw(st.sampled_from([index for index, count in enumerate(counts) if count]))
    target = data.draw(st.sampled_from([index for index in range(len(prompts)) if index != source]))
    per_prompt = list(counts)
    per_prompt[source] -= 1
    per_prompt[target] += 1
    images = [[PIL.Image.new("RGB", (8, 8))] * count for count in per_prompt]
    first = min(source, target)
    message = rf"Prompt {first} holds {counts[first]} <image> placeholder\(s\) but its list"
    with pytest.raises(ValueError, match=message):
        processor(text=prompts, images=images)


@FAST
@given(prompts=st.lists(prompt_text, min_size=1, max_size=3))
def test_image_generation_prompts_end_with_begin_of_image_and_hold_no_placeholder(processor, prompts):
    inputs = processor(text=prompts, generation_mode="image", return_tensors="pt")
    assert (inputs["input_ids"][:, -1] == processor.boi_token_id).all()
    assert not (inputs["input_ids"] == processor.image_token_id).any()
