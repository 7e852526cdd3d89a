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
"""PIL/NumPy image processor for the DualToken vision tokenizer, and the one image path of the project.

Every tool that reads or writes images goes through this module: [`open_image`] (files, bytes, `datasets` values ->
upright RGB), [`flatten_images`] (nested inputs -> single images), [`DualTokenImageProcessor`] (images ->
`pixel_values` in [-1, 1] and back), and [`to_pixel_values`] / [`to_pil_images`] (8-bit images <-> `pixel_values`,
without resizing).

Hub-facing module: it imports only transformers, torch, numpy, PIL and its sibling `configuration_dualtoken`, so it
can be copied (with that sibling) into a model folder and loaded with
`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)`.
"""

import io
import os
import re
import warnings
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import auto_docstring, is_torch_available

from .configuration_dualtoken import SIGLIP_SO400M_PATCH14_384, DualTokenVisionConfig


if is_torch_available():
    import torch


# The class defaults describe the paper's tokenizer, whose SigLIP tower reads 384 x 384 images.
_PAPER_IMAGE_SIZE = SIGLIP_SO400M_PATCH14_384["image_size"]

_VALID_CHANNELS = (1, 3, 4)
_POSTPROCESS_RETURN_TYPES = ("PIL.Image.Image", "np", "pt")
# 16-bit PIL modes (16-bit PNG/TIFF decode to these); their values are read as 0..65535.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# Modes whose values do not fit 8 bits: the processor keeps their precision, `open_image` rounds them to 8 bits.
_HIGH_BIT_DEPTH_MODES = (*_SIXTEEN_BIT_MODES, "F")
# Bicubic resampling of float images in [0, 1] may overshoot by a hair; larger excursions mean a wrong value range.
_FLOAT_RANGE_TOLERANCE = 1e-3


@auto_docstring(
    custom_intro="""
    Image processor of the DualToken vision tokenizer, following the SigLIP recipe of its semantic encoder.

    Every image goes through:

    1. conversion to 3-channel RGB (see "Accepted inputs");
    2. a bicubic resize (`PIL.Image.BICUBIC`) of the shortest side to `size["shortest_edge"]`, keeping the aspect
       ratio (the long side becomes `int(shortest_edge * long / short)`);
    3. a center crop to `crop_size` (top/left offset `(resized - crop) // 2`);
    4. a rescale by `rescale_factor` (1/255) and a normalization with `image_mean` = `image_std` = (0.5, 0.5, 0.5),
       so that pixel values lie in [-1, 1].

    The result is a [`~transformers.BatchFeature`] whose `pixel_values` is a float32 `(batch, 3, height, width)`
    tensor (`return_tensors="pt"`), array (`"np"`), or a list of `(3, height, width)` float32 arrays
    (`return_tensors=None`, the transformers convention).

    Accepted inputs (a single image, a list/tuple of images of any sizes, or a 4-D batch):

    - `PIL.Image.Image` in any mode. Modes with transparency (`RGBA`, `LA`, `PA`, `P` or `RGB`/`L` with a
      transparency key) are alpha-composited on a **white** background. `I;16*` and `I` modes are read as 16-bit
      (0..65535), `F` as float in [0, 1]; every other mode uses PIL's own conversion to `RGB`.
    - `numpy.ndarray` / `torch.Tensor` of shape `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in {1, 3, 4}, or
      `(B, H, W, C)` / `(B, C, H, W)` batches. Integer and boolean images hold values in 0..255 (booleans map to
      0/255); float images hold values in [0, 1]. When both ends of the shape could be channels (e.g. `(3, 5, 3)`),
      NumPy arrays are read channels-last and torch tensors channels-first, unless `input_data_format` says
      otherwise. Four channels are RGBA and are composited on white like PIL images.
    - `str` / `os.PathLike` paths to image files, read with [`open_image`] (EXIF orientation applied, 8-bit RGB).

    Anything else (an empty list, a zero-size image, 2 or 5 channels, NaN/inf, out-of-range values, a wrong number
    of dimensions, an unreadable path, a non-image object) raises `ValueError` naming the problem.

    Settings (constructor arguments, each also a per-call override of `preprocess`): `size` is
    `{"shortest_edge": n}` (keeps the aspect ratio, the default with n = 384) or `{"height": h, "width": w}` (exactly
    that size); `crop_size` is the center crop taken after resizing; `resample` the PIL filter of the resize;
    `do_resize`, `do_center_crop`, `do_rescale` and `do_normalize` (all `True`) switch off one step; `rescale_factor`
    (1/255) maps 0..255 to [0, 1]; `image_mean` and `image_std` (0.5 each) then map [0, 1] to [-1, 1].

    """
)
class DualTokenImageProcessor(PilBackend):
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"shortest_edge": _PAPER_IMAGE_SIZE}
    crop_size = {"height": _PAPER_IMAGE_SIZE, "width": _PAPER_IMAGE_SIZE}
    default_to_square = False
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    @classmethod
    def from_vision_config(cls, config, **kwargs) -> "DualTokenImageProcessor":
        """
        Build the image processor of a tokenizer from its config.

        Args:
            config (`DualTokenVisionConfig` or `DualTokenConfig`):
                The tokenizer's config, or a unified model's (its `vision_config` is used).
            kwargs:
                Overrides passed on to the constructor.

        Returns:
            `DualTokenImageProcessor`: resizing the shortest side to, and center-cropping a square of, the
            tokenizer's image size (its SigLIP tower's `image_size`).

        Raises:
            `ValueError`: if `config` is neither config.
        """
        vision_config = getattr(config, "vision_config", config)
        # Compared by model type, not class: a config from the package and one from a folder's remote code are
        # different classes for the same model.
        if getattr(vision_config, "model_type", None) != DualTokenVisionConfig.model_type:
            raise ValueError(
                f"config must be a DualTokenVisionConfig or a DualTokenConfig, got {type(config).__name__}"
            )
        image_size = vision_config.image_size
        size_kwargs = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
        return cls(**{**size_kwargs, **kwargs})

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "DualTokenImageProcessor":
        """
        The image processor of a tokenizer preset: [`~DualTokenImageProcessor.from_vision_config`] of
        `DualTokenVisionConfig.from_preset(name)` (`"paper"` and `"v2"` read 384 px, `"tiny"` 64 px), with `kwargs`
        overriding constructor arguments.
        """
        return cls.from_vision_config(DualTokenVisionConfig.from_preset(name), **kwargs)

    @auto_docstring(
        custom_intro="""
        Preprocess an image or a batch of images into `pixel_values` in [-1, 1]. Every constructor argument (`size`,
        `crop_size`, `resample`, `do_resize`, ...) can be overridden for one call. `return_tensors="pt"` gives a
        float32 `torch.Tensor` of shape `(B, 3, H, W)`, `"np"` a NumPy array of that shape and `None` a list of
        `(3, H, W)` float32 arrays; `input_data_format` (`"channels_first"` or `"channels_last"`) settles 3-D
        arrays/tensors whose layout is ambiguous.

        """
    )
    def preprocess(self, images: ImageInput, **kwargs: Unpack[ImagesKwargs]) -> BatchFeature:
        r"""
        images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str`, or a list of those):
            A single image, a list/tuple of images (sizes may differ) or a 4-D batch; see the class docstring for
            the accepted types, modes, layouts and value ranges.

        Returns:
            [`~transformers.BatchFeature`] with a single key, `pixel_values`.

        Raises:
            `ValueError`: for malformed inputs; the message names the problem and what is allowed.
        """
        return super().preprocess(images, **kwargs)

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        """Flatten the input into a list of single images (see [`flatten_images`]) and open the paths."""
        flat_images = [open_image(image) if isinstance(image, str) else image for image in flatten_images(images)]
        if not flat_images:
            raise ValueError("No images to process: got an empty list/batch; pass at least one image.")
        return flat_images

    def process_image(self, image, input_data_format: str | ChannelDimension | None = None, **kwargs) -> np.ndarray:
        """
        Convert one image to a channels-first RGB array: `uint8` (exactly as PIL would) or `float32` on the 0..255
        scale (float and 16-bit inputs, to keep their precision).
        """
        if isinstance(image, PIL.Image.Image):
            return _pil_to_rgb(image)
        channels_first_if_ambiguous = not isinstance(image, np.ndarray)
        if input_data_format is not None:
            channels_first_if_ambiguous = ChannelDimension(input_data_format) == ChannelDimension.FIRST
        return _array_to_rgb(_to_numpy(image), channels_first_if_ambiguous)

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """
        Resize a channels-first image with PIL.

        `{"shortest_edge": n}` scales the short side to n and the long side to `int(n * long / short)`;
        `{"height": h, "width": w}` resizes to exactly (h, w). `uint8` images are resized as PIL `RGB` images, float
        images channel by channel as PIL `F` images, in the same two clipped passes as PIL's 8-bit path but without
        rounding to 8 bits.
        """
        resample = self.resample if resample is None else resample
        height, width = image.shape[-2:]
        if size.shortest_edge:
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
            new_height, new_width = (new_short, new_long) if height <= width else (new_long, new_short)
        elif size.height and size.width:
            new_height, new_width = size.height, size.width
        else:
            raise ValueError(f"size must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {dict(size)}")

        if (new_height, new_width) == (height, width):
            return image
        if image.dtype == np.uint8:
            resized = PIL.Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize(
                (new_width, new_height), resample=resample
            )
            return np.asarray(resized).transpose(2, 0, 1)
        # PIL's 8-bit resize is a horizontal pass then a vertical pass, clipping to 0..255 in between; doing the
        # same on float ("F") channels keeps float inputs equal to their 8-bit PIL equivalent up to rounding.
        channels = []
        for channel in image:
            channel = PIL.Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
            for pass_size in ((new_width, height), (new_width, new_height)):
                channel = PIL.Image.fromarray(
                    np.clip(np.asarray(channel.resize(pass_size, resample=resample)), 0.0, 255.0)
                )
            channels.append(np.asarray(channel))
        return np.stack(channels)

    def postprocess(self, pixel_values, return_tensors: str = "PIL.Image.Image"):
        """
        Map `pixel_values` (e.g. decoded by the tokenizer) back to 8-bit RGB images.

        Inverts normalization and rescaling, `(x * std + mean) / rescale_factor`, which with the defaults is
        `(x + 1) * 127.5`, then rounds and clamps to [0, 255].

        Args:
            pixel_values (`torch.Tensor` or `np.ndarray`):
                Shape `(B, 3, H, W)` or `(3, H, W)`, finite values, nominally in [-1, 1].
            return_tensors (`str`, *optional*, defaults to `"PIL.Image.Image"`):
                `"PIL.Image.Image"` for a list of RGB `PIL.Image.Image`, `"np"` for a `uint8` array of shape
                `(B, H, W, 3)`, `"pt"` for a `uint8` `torch.Tensor` of shape `(B, 3, H, W)`.

        Returns:
            `list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`; always batched, also for a `(3, H, W)` input.

        Raises:
            `ValueError`: for an unknown `return_tensors`, a wrong shape, or non-finite values.
        """
        if return_tensors not in _POSTPROCESS_RETURN_TYPES:
            raise ValueError(
                f"Unknown return_tensors {return_tensors!r}; valid values are {list(_POSTPROCESS_RETURN_TYPES)}"
            )
        if isinstance(pixel_values, (list, tuple)):
            if not pixel_values:
                raise ValueError("pixel_values is an empty list; pass at least one (3, H, W) image")
            pixel_values = np.stack([_to_numpy(image) for image in pixel_values])
        values = _to_numpy(pixel_values)
        if values.ndim == 3:
            values = values[None]
        if values.ndim != 4 or values.shape[0] == 0 or values.shape[1] != 3 or 0 in values.shape[2:]:
            raise ValueError(
                f"pixel_values must have shape (B, 3, H, W) or (3, H, W) with B, H, W > 0, got {tuple(values.shape)}"
            )
        if values.dtype.kind not in "biuf":
            raise ValueError(f"pixel_values must be a real-valued array, got dtype {values.dtype}")
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("pixel_values contain NaN or inf values; only finite values can be converted to images")

        if self.do_normalize:
            std = np.asarray(self.image_std, dtype=np.float64).reshape(-1, 1, 1)
            mean = np.asarray(self.image_mean, dtype=np.float64).reshape(-1, 1, 1)
            values = values * std + mean
        if self.do_rescale:
            values = values / self.rescale_factor
        images = np.clip(np.round(values), 0, 255).astype(np.uint8)

        if return_tensors == "pt":
            return torch.from_numpy(images)
        images = images.transpose(0, 2, 3, 1)
        if return_tensors == "np":
            return np.ascontiguousarray(images)
        return [PIL.Image.fromarray(np.ascontiguousarray(image)) for image in images]


def open_image(image) -> PIL.Image.Image:
    """
    Read one image the way every DualToken tool does: decoded completely, upright and in 8-bit RGB.

    - The EXIF orientation is applied (a photo taken in portrait comes out in portrait).
    - The whole image is decoded now, so a truncated or corrupt file fails here rather than in a later resize.
    - The mode is converted as [`DualTokenImageProcessor`] converts PIL images: transparency (`RGBA`, `LA`, `PA`,
      `P` or `L`/`RGB` with a transparency key) is composited on white, 16-bit (`I;16*`, `I`) and float (`F`) images
      are scaled to 8 bits (not clipped), every other mode (`1`, `L`, `P`, `CMYK`, `YCbCr`, ...) goes through PIL's
      own conversion.
    - Of an animation file (GIF, APNG, WebP), the first frame.

    Args:
        image (`str`, `os.PathLike`, `bytes`, a binary file object, `dict` or `PIL.Image.Image`):
            A path to an image file, the bytes of one, an open binary file, what `datasets` holds for an undecoded
            image (`{"bytes": ..., "path": ...}`: the bytes when present, else the path), or a PIL image (not
            modified; a lazily opened one is decoded now).

    Returns:
        `PIL.Image.Image`: a new image of mode `RGB`.

    Raises:
        `ValueError`: when the image cannot be read (missing, truncated or corrupt file, not an image, ...); the
        message names the file and says why. Also for an unsupported type of `image`, and for a file of more than
        `PIL.Image.MAX_IMAGE_PIXELS` pixels (PIL's decompression-bomb guard, 89,478,485 by default), which is
        refused from its header, before anything is decoded (PIL itself only warns up to twice that limit).
    """
    source, name = _image_source(image)
    # PIL's decoders report unreadable data with many exception types (OSError, SyntaxError, struct.error, ...); to
    # a caller they all mean the same: this is not a readable image.
    try:
        if isinstance(source, PIL.Image.Image):
            source.load()
            return _to_rgb_image(PIL.ImageOps.exif_transpose(source))
        with warnings.catch_warnings():
            # Between its limit and twice it PIL only warns, then decodes the whole image anyway.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(source) as opened:
                opened.load()
                return _to_rgb_image(PIL.ImageOps.exif_transpose(opened))
    except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as error:
        raise ValueError(_too_many_pixels_message(name, error)) from error
    except Exception as error:
        raise ValueError(f"cannot read {name} as an image: {error}") from error


def _too_many_pixels_message(name: str, error: Exception) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(error))  # PIL's message is the only place that holds the count
    count = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
    return (
        f"cannot read {name} as an image: it has {count}, more than PIL.Image.MAX_IMAGE_PIXELS = "
        f"{PIL.Image.MAX_IMAGE_PIXELS:,}, PIL's guard against decompression bombs; raise that limit only for files "
        "you trust"
    )


def _image_source(image) -> tuple[Any, str]:
    """What `PIL.Image.open` (or `open_image`, for PIL images) reads for `image`, and how error messages name it."""
    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        data, path = image.get("bytes"), image.get("path")
        if data is None and path is None:
            raise ValueError("cannot read an image from a datasets value whose 'bytes' and 'path' are both None")
        if data is None:
            return _image_source(path)
        return io.BytesIO(data), repr(path) if path else f"{len(data)} bytes of image data"
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return io.BytesIO(data), f"{len(data)} bytes of image data"
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image), repr(os.fspath(image))
    if isinstance(image, PIL.Image.Image):
        return image, repr(image.filename) if getattr(image, "filename", None) else f"a {image.mode} PIL image"
    if hasattr(image, "read"):
        return image, repr(image.name) if isinstance(getattr(image, "name", None), str) else "a file object"
    raise ValueError(
        f"Unsupported image source {type(image).__name__}: pass a path, bytes, a binary file object, a datasets "
        "image value ({'bytes': ..., 'path': ...}) or a PIL.Image.Image."
    )


def flatten_images(images) -> list:
    """
    The single images of `images`, in order: lists and tuples (nested to any depth) are flattened and 4-D
    arrays/tensors split along their first (batch) axis. The processor and the image processor both read their
    inputs through this.

    Args:
        images:
            A `PIL.Image.Image`, a 2-D/3-D `numpy.ndarray` or `torch.Tensor`, a `str`/`os.PathLike` path, a 4-D
            array/tensor (a batch), or a (nested) list/tuple of those.

    Returns:
        `list`: PIL images, 2-D/3-D arrays/tensors and paths (as `str`, not opened); empty for an empty input.

    Raises:
        `ValueError`: for another type or an array/tensor with other than 2, 3 or 4 dimensions.
    """
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if isinstance(images, (str, os.PathLike)):
        return [os.fspath(images)]
    if isinstance(images, PIL.Image.Image):
        return [images]
    if isinstance(images, np.ndarray) or (is_torch_available() and isinstance(images, torch.Tensor)):
        if images.ndim == 4:
            return [images[index] for index in range(images.shape[0])]
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(
            f"An image array must have 2 (H, W), 3 (H, W, C or C, H, W) or 4 (batch) dimensions, got "
            f"{images.ndim} dimensions with shape {tuple(images.shape)}."
        )
    raise ValueError(
        f"Unsupported image type {type(images).__name__}: pass a PIL.Image.Image, a numpy.ndarray, a torch.Tensor, "
        "a path to an image file, or a list of those."
    )


def to_pixel_values(images) -> "torch.Tensor":
    """
    8-bit images -> `pixel_values` in [-1, 1] at their own size: `x / 127.5 - 1` per channel, the rescale and
    normalization of [`DualTokenImageProcessor`] with its resize and crop switched off.

    Args:
        images:
            One image or a list of images of one size, of any type the image processor accepts (typically RGB
            `PIL.Image.Image`s, e.g. from [`open_image`]).

    Returns:
        `torch.Tensor`: float32, shape `(B, 3, H, W)`; [`to_pil_images`] gives the 8-bit images back exactly.
    """
    processor = DualTokenImageProcessor(do_resize=False, do_center_crop=False)
    return processor(images, return_tensors="pt")["pixel_values"]


def to_pil_images(pixel_values) -> list[PIL.Image.Image]:
    """
    `pixel_values` in [-1, 1] (e.g. decoded by the tokenizer) -> RGB PIL images: `(x + 1) * 127.5`, rounded and
    clamped to 0..255, i.e. [`DualTokenImageProcessor.postprocess`] with the default normalization.

    Args:
        pixel_values (`torch.Tensor` or `np.ndarray`):
            Shape `(B, 3, H, W)` or `(3, H, W)`, finite values; values outside [-1, 1] are clamped.

    Returns:
        `list[PIL.Image.Image]`: one `RGB` image per batch element.
    """
    return DualTokenImageProcessor().postprocess(pixel_values, return_tensors="PIL.Image.Image")


def _to_numpy(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    if is_torch_available() and isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.bfloat16, torch.float16):
            image = image.float()
        return image.numpy()
    raise ValueError(
        f"Unsupported image type {type(image).__name__}: expected a numpy.ndarray or a torch.Tensor"
    )


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """
    PIL image in any mode -> channels-first RGB array: `uint8`, or `float32` on the 0..255 scale for 16-bit and float
    modes (to keep their precision); transparent pixels are composited on white.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        return _array_to_rgb(np.asarray(image, dtype=np.float64) / 65535.0, channels_first_if_ambiguous=False)
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image), channels_first_if_ambiguous=False)
    return np.asarray(_to_rgb_image(image)).transpose(2, 0, 1)


def _to_rgb_image(image: PIL.Image.Image) -> PIL.Image.Image:
    """PIL image in any mode -> 8-bit `RGB` PIL image, converted as `_pil_to_rgb` does (16-bit and float rounded)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Got a zero-size image ({image.width}x{image.height}); images need at least one pixel.")
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        rgb = np.round(_pil_to_rgb(image)).astype(np.uint8)
        return PIL.Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)))
    if image.mode == "La":  # premultiplied alpha: PIL converts it to nothing but "LA"
        image = image.convert("LA")
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = PIL.Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"Cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error
    return rgb


def _array_to_rgb(image: np.ndarray, channels_first_if_ambiguous: bool) -> np.ndarray:
    """2-D/3-D array -> channels-first RGB array (`uint8`, or `float32` on the 0..255 scale for float inputs)."""
    if image.size == 0:
        raise ValueError(f"Got a zero-size image of shape {image.shape}; images need at least one pixel.")
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3:
        image = _to_channels_first(image, channels_first_if_ambiguous)
    else:
        raise ValueError(
            f"An image must have 2 (H, W) or 3 (H, W, C or C, H, W) dimensions, got {image.ndim} dimensions "
            f"with shape {image.shape}."
        )

    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise ValueError("The image contains NaN or inf values; only finite pixel values are allowed.")
        low, high = float(image.min()), float(image.max())
        if low < -_FLOAT_RANGE_TOLERANCE or high > 1.0 + _FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"Float images must have values in [0, 1], got values in [{low:.4g}, {high:.4g}]; divide 0..255 "
                "images by 255 or pass them as uint8."
            )
        return _float_to_rgb(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0)
    if image.dtype.kind == "b":
        image = image.astype(np.uint8) * 255
    elif image.dtype.kind in "iu":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer images must have values in 0..255, got values in [{low}, {high}]; scale 16-bit images to "
                "8 bits or pass them as float in [0, 1]."
            )
        image = image.astype(np.uint8)
    else:
        raise ValueError(f"Unsupported image dtype {image.dtype}: use uint8 (0..255) or float (0..1).")

    # uint8 arrays take the PIL path so that they give exactly what the equivalent PIL image gives.
    # (H, W) uint8 -> "L", (H, W, 3) -> "RGB", (H, W, 4) -> "RGBA".
    channels_last = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    return _pil_to_rgb(PIL.Image.fromarray(np.ascontiguousarray(channels_last)))


def _to_channels_first(image: np.ndarray, channels_first_if_ambiguous: bool) -> np.ndarray:
    first_is_channel = image.shape[0] in _VALID_CHANNELS
    last_is_channel = image.shape[-1] in _VALID_CHANNELS
    if first_is_channel and last_is_channel:
        first_is_channel = channels_first_if_ambiguous
    elif not (first_is_channel or last_is_channel):
        raise ValueError(
            f"Could not find the channels axis of an image of shape {image.shape}: the first or last dimension "
            f"must be the channels, with {_VALID_CHANNELS} channels (grayscale, RGB, RGBA)."
        )
    return image if first_is_channel else image.transpose(2, 0, 1)


def _float_to_rgb(image: np.ndarray) -> np.ndarray:
    """Channels-first float image on the 0..255 scale with 1, 3 or 4 channels -> 3 channels; alpha over white."""
    if image.shape[0] == 1:
        return np.repeat(image, 3, axis=0)
    if image.shape[0] == 4:
        alpha = image[3:] / 255.0
        return image[:3] * alpha + 255.0 * (1.0 - alpha)
    return image


__all__ = ["DualTokenImageProcessor", "flatten_images", "open_image", "to_pil_images", "to_pixel_values"]
