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
"""Processor of the unified DualToken model: text tokenizer + image processor + chat template.

Hub-facing module: it imports only transformers, numpy, torch and its sibling `image_processing_dualtoken` (which
imports `configuration_dualtoken`), so it can be copied (with those siblings) into a model folder and loaded with
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`.
"""

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import auto_docstring, is_torch_available

from .image_processing_dualtoken import DualTokenImageProcessor, flatten_images


if is_torch_available():
    import torch


GENERATION_MODES = ("text", "image")

# ChatML in the Qwen2.5 format, without Qwen's default system prompt. An image item of a message renders the image
# placeholder, which the processor expands to `<begin_of_image>` + one placeholder per grid position +
# `<end_of_image>`. Assistant turns sit in a `{% generation %}` block so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` can mask everything but the replies in training.
_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render_content(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}{{- render_content(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def default_chat_template(image_token: str = "<image>") -> str:
    """
    The default chat template: ChatML as in Qwen2.5 (`<|im_start|>role\\n...<|im_end|>\\n`, `add_generation_prompt`
    appends `<|im_start|>assistant\\n`), rendering an image item of a message as `image_token`.
    """
    return _CHAT_TEMPLATE.replace("'<image>'", "'" + image_token.replace("\\", "\\\\").replace("'", "\\'") + "'")


class DualTokenProcessorKwargs(ProcessingKwargs, total=False):
    """
    generation_mode (`str`, *optional*, defaults to `"text"`):
        `"text"`: the prompts are used as given (understanding, chat turns rendered by
        [`~DualTokenProcessor.apply_chat_template`]). `"image"`: text-to-image prompts. Each prompt becomes a user
        turn followed by the assistant generation prompt of the chat template (unless `use_chat_template=False`, or
        the prompt already contains a special token of the tokenizer such as `<|im_start|>`, i.e. it was formatted
        already), and `boi_token` is appended so that the model continues with image positions. Images are not
        allowed in this mode.
    use_chat_template (`bool`, *optional*, defaults to `True`):
        In `generation_mode="image"`, wrap each raw prompt in the chat template (a user turn followed by the assistant
        generation prompt). `False` keeps the raw prompt.
    """

    generation_mode: str
    use_chat_template: bool


@auto_docstring(
    custom_intro="""
    Processor of [`DualTokenForConditionalGeneration`]: a text tokenizer, a [`DualTokenImageProcessor`] and a chat
    template.

    An image is read by the model as one embedding per grid position (paper §3.3), so the processor expands every
    `image_token` in the text to `boi_token` + `image_token` × `num_image_tokens` + `eoi_token`, and returns the
    images' `pixel_values` alongside.

    Batches are padded on the **left** by default (the processor sets `tokenizer.padding_side = "left"`), so that
    `generate` continues every prompt right after its last token; the model handles left padding through the
    attention mask. Pass `padding_side="right"` to a call to change this for that call (e.g. for training).

    """
)
class DualTokenProcessor(ProcessorMixin):
    valid_processor_kwargs = DualTokenProcessorKwargs
    # Lowest-priority defaults of `_merge_kwargs`: pad batches (to the longest prompt) on the left, and never return
    # token type ids, which the model does not take.
    text_kwargs = {"padding": True, "padding_side": "left", "return_token_type_ids": False}
    generation_mode = "text"

    def __init__(
        self,
        image_processor: DualTokenImageProcessor,
        tokenizer,
        chat_template: str | None = None,
        num_image_tokens: int = 729,
        image_token: str | None = None,
        boi_token: str | None = None,
        eoi_token: str | None = None,
        **kwargs,
    ):
        r"""
        image_processor ([`DualTokenImageProcessor`]):
            Turns images into `pixel_values` in [-1, 1] and decoded pixels back into PIL images.
        tokenizer ([`PreTrainedTokenizerBase`]):
            Any fast tokenizer that has `image_token`, `boi_token` and `eoi_token` as added (special) tokens.
        chat_template (`str`, *optional*):
            A Jinja chat template. Defaults to [`default_chat_template`] (ChatML, Qwen2.5 format).
        num_image_tokens (`int`, *optional*, defaults to 729):
            Positions per image, i.e. the side of the tokenizer's grid squared: 27 × 27 = 729 for the 384 px
            `paper`/`v2` tokenizers, 8 × 8 = 64 for the `tiny` one.
        image_token (`str`, *optional*):
            Placeholder of one grid position. Defaults to the tokenizer's `image_token` attribute, else `"<image>"`.
        boi_token (`str`, *optional*):
            Opens an image. Defaults to the tokenizer's `boi_token` attribute, else `"<begin_of_image>"`.
        eoi_token (`str`, *optional*):
            Closes an image. Defaults to the tokenizer's `eoi_token` attribute, else `"<end_of_image>"`.
        """
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(
                "num_image_tokens must be a positive int (grid side squared, e.g. 729 or 64), got "
                f"{num_image_tokens!r}"
            )
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token or getattr(tokenizer, "image_token", None) or "<image>"
        self.boi_token = boi_token or getattr(tokenizer, "boi_token", None) or "<begin_of_image>"
        self.eoi_token = eoi_token or getattr(tokenizer, "eoi_token", None) or "<end_of_image>"
        if chat_template is None:
            chat_template = default_chat_template(self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

        self.image_token_id = self._added_token_id(self.image_token, "image_token")
        self.boi_token_id = self._added_token_id(self.boi_token, "boi_token")
        self.eoi_token_id = self._added_token_id(self.eoi_token, "eoi_token")
        self.tokenizer.padding_side = "left"

    def _added_token_id(self, token: str, name: str) -> int:
        added_vocab = self.tokenizer.get_added_vocab()
        if token not in added_vocab:
            raise ValueError(
                f"{name}={token!r} is not an added token of the tokenizer ({type(self.tokenizer).__name__}), so it "
                f"could be split into several ids. Add it with `tokenizer.add_special_tokens("
                f"{{'extra_special_tokens': [{token!r}]}}, replace_extra_special_tokens=False)` (and resize the "
                "model's token embeddings), or pass the name of a token the tokenizer has."
            )
        return added_vocab[token]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    @auto_docstring(
        custom_intro="""
        Tokenize prompts and preprocess their images.

        Every `image_token` in the text stands for one image and is expanded to `boi_token` + `image_token` ×
        `num_image_tokens` + `eoi_token`; the i-th placeholder of the batch (in reading order) belongs to the i-th
        image. When images are given but the text holds **no** placeholder, one placeholder per image is prepended to
        its prompt: all images to the single prompt, one image per prompt when there are as many images as prompts,
        or `images[i]` (a list) to prompt i when images come as one list per prompt.

        Batches are padded to the longest prompt (`padding=True`), on the left unless `padding_side="right"` is
        passed. Further tokenizer (`truncation`, `max_length`, ...) and image processor arguments are passed on;
        `return_tensors` is `"pt"`, `"np"` or `None` (default, lists).

        """
    )
    def __call__(
        self,
        text: str | list[str] | None = None,
        images: ImageInput | None = None,
        **kwargs: Unpack[DualTokenProcessorKwargs],
    ) -> BatchFeature:
        r"""
        text (`str` or `list[str]`, *optional*):
            One prompt or a batch of prompts.
        images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str`, or a list of those, *optional*):
            One image or several: `PIL.Image.Image`, `numpy.ndarray`, `torch.Tensor`, a path, a list of
            those, a 4-D batch, or a list with one list of images per prompt. See [`DualTokenImageProcessor`].

        Returns:
            [`~transformers.BatchFeature`] with `input_ids`, `attention_mask` and, when images are given,
            `pixel_values`.

        Raises:
            `ValueError`: for an unknown `generation_mode`, text that is not a string or a list of strings, images in
            `generation_mode="image"`, or a number of placeholders that differs from the number of images (prompt
            by prompt when images come as one list per prompt).
        """
        generation_mode = kwargs.pop("generation_mode", self.generation_mode)
        use_chat_template = kwargs.pop("use_chat_template", True)
        if generation_mode not in GENERATION_MODES:
            raise ValueError(f"generation_mode must be one of {list(GENERATION_MODES)}, got {generation_mode!r}")
        if text is None and images is None:
            raise ValueError(f"{type(self).__name__} needs text, images or both; got neither")
        if text is not None:
            text = self._validate_text(text)

        if generation_mode == "image":
            if images is not None:
                raise ValueError(
                    "generation_mode='image' builds text-to-image prompts and takes no images; got images. Use "
                    "generation_mode='text' to ask about images."
                )
            if text is None:
                raise ValueError("generation_mode='image' needs text prompts; got text=None")
            text = [self._image_generation_prompt(prompt, use_chat_template) for prompt in text]
        elif images is not None:
            images, images_per_prompt = _flatten_images(images)
            if text is not None and not any(self.image_token in prompt for prompt in text):
                text = self._prepend_placeholders(text, len(images), images_per_prompt)
            elif text is not None and images_per_prompt is not None and len(images_per_prompt) == len(text):
                self._check_placeholders_per_prompt(text, images_per_prompt)

        return super().__call__(images=images, text=text, **kwargs)

    def _validate_text(self, text) -> list[str]:
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and text and all(isinstance(prompt, str) for prompt in text):
            return list(text)
        raise ValueError(
            f"text must be a string or a non-empty list of strings, got {_describe(text)}; pre-tokenized input is "
            "not supported."
        )

    def _prepend_placeholders(
        self, text: list[str], num_images: int, images_per_prompt: list[int] | None
    ) -> list[str]:
        if images_per_prompt is not None and len(images_per_prompt) == len(text):
            counts = images_per_prompt
        elif len(text) == 1:
            counts = [num_images]
        elif num_images == len(text):
            counts = [1] * len(text)
        else:
            raise ValueError(
                f"Got {len(text)} prompts without {self.image_token} placeholders and {num_images} images, so which "
                f"image belongs to which prompt is ambiguous: put {self.image_token} where each image goes, or pass "
                "one list of images per prompt."
            )
        return [self.image_token * count + prompt for prompt, count in zip(text, counts)]

    def _check_placeholders_per_prompt(self, text: list[str], images_per_prompt: list[int]):
        """With one list of images per prompt, each prompt's placeholders are its own images: the counts must match
        prompt by prompt, not only in total, or an image would silently go to the next prompt."""
        for index, (prompt, num_images) in enumerate(zip(text, images_per_prompt)):
            num_placeholders = prompt.count(self.image_token)
            if num_placeholders != num_images:
                raise ValueError(
                    f"Prompt {index} holds {num_placeholders} {self.image_token} placeholder(s) but its list has "
                    f"{num_images} image(s); each prompt needs one {self.image_token} per image of its own list."
                )

    def _image_generation_prompt(self, prompt: str, use_chat_template: bool) -> str:
        if self.image_token in prompt:
            raise ValueError(
                f"generation_mode='image' takes text-only prompts, got a prompt containing {self.image_token}: "
                f"{prompt[:80]!r}"
            )
        already_formatted = any(token in prompt for token in self._control_tokens())
        if use_chat_template and self.chat_template is not None and not already_formatted:
            conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            prompt = self.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if not prompt.endswith(self.boi_token):
            prompt += self.boi_token
        return prompt

    def _control_tokens(self) -> list[str]:
        image_tokens = {self.image_token, self.boi_token, self.eoi_token}
        return [token for token in self.tokenizer.all_special_tokens if token and token not in image_tokens]

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """
        Check that the prompts hold exactly one `image_token` per image (after `__call__` inserted missing ones).

        Replaces the base check, whose image flattening rejects inputs that [`DualTokenImageProcessor`] accepts
        (2-D arrays, mixed lists).
        """
        if images is None and text is None:
            raise ValueError(f"{type(self).__name__} needs text, images or both; got neither")
        if text is None:
            return
        num_placeholders = sum(prompt.count(self.image_token) for prompt in text)
        num_images = 0 if images is None else len(_flatten_images(images)[0])
        if num_placeholders != num_images:
            raise ValueError(
                f"The text holds {num_placeholders} {self.image_token} placeholder(s) but {num_images} image(s) were "
                f"given; each {self.image_token} stands for exactly one image."
            )

    def _process_images(self, images, **kwargs):
        processed_images = self.image_processor(images, **kwargs)
        num_images = len(processed_images["pixel_values"])
        replacements = [self.replace_image_token(processed_images, image_idx=index) for index in range(num_images)]
        return processed_images, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The expansion of one `image_token`: `boi_token` + `image_token` × `num_image_tokens` + `eoi_token`."""
        return self.boi_token + self.image_token * self.num_image_tokens + self.eoi_token

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens: bool = True, **kwargs
    ) -> list[str]:
        """
        Decode generated token ids to texts.

        Args:
            generated_outputs (`torch.Tensor`, `np.ndarray` or `list`):
                Token ids of shape `(batch, sequence)` or `(sequence,)`.
            skip_special_tokens (`bool`, *optional*, defaults to `True`):
                Drop special tokens (image placeholders, chat markers, padding) from the texts.
            kwargs:
                Passed on to the tokenizer's `batch_decode`.

        Returns:
            `list[str]`: one text per sequence (also for a single 1-D sequence).
        """
        return self.tokenizer.batch_decode(
            _as_batch_of_sequences(generated_outputs), skip_special_tokens=skip_special_tokens, **kwargs
        )

    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens: bool = True, generation_mode: str | None = None, **kwargs
    ):
        """
        Turn the output of `generate` (texts) or of the model's `decode_image_tokens` (images) into texts or images.

        Args:
            generated_outputs:
                `generation_mode` `None`/`"text"`: token ids, see
                [`~DualTokenProcessor.post_process_image_text_to_text`].
                `"image"`: decoded images, a float tensor/array of shape `(B, 3, H, W)` (or `(3, H, W)`) in [-1, 1].
            skip_special_tokens (`bool`, *optional*, defaults to `True`):
                For texts: drop special tokens.
            generation_mode (`str`, *optional*):
                `"text"` (default) or `"image"`.
            kwargs:
                For texts, passed on to the tokenizer's `batch_decode`; ignored for images.

        Returns:
            `list[str]` or `list[PIL.Image.Image]`.
        """
        if generation_mode is None or generation_mode == "text":
            return self.post_process_image_text_to_text(
                generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs
            )
        if generation_mode == "image":
            dtype = getattr(generated_outputs, "dtype", None)
            is_float = dtype is not None and (
                (is_torch_available() and isinstance(dtype, torch.dtype) and dtype.is_floating_point)
                or (isinstance(dtype, np.dtype) and dtype.kind == "f")
            )
            if dtype is not None and not is_float:
                raise ValueError(
                    f"generation_mode='image' expects decoded images (float, (B, 3, H, W) in [-1, 1]), got dtype "
                    f"{dtype}; turn generated image codes into pixels with the model's `decode_image_tokens` first."
                )
            return self.postprocess(generated_outputs, return_tensors="PIL.Image.Image")
        raise ValueError(
            f"{type(self).__name__} generates text or images: generation_mode must be None, 'text' or 'image', got "
            f"{generation_mode!r}"
        )

    def postprocess(self, images, return_tensors: str = "PIL.Image.Image", **kwargs):
        """
        Decoded pixels (`(B, 3, H, W)` in [-1, 1]) -> images; see [`DualTokenImageProcessor.postprocess`].
        """
        return self.image_processor.postprocess(images, return_tensors=return_tensors, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        """Forwards to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        """Forwards to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)


def _flatten_images(images) -> tuple[list, list[int] | None]:
    """
    `images` as a list of single images (see [`flatten_images`]), and the number of images per prompt when they come
    as one list per prompt (else `None`).
    """
    if isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images):
        per_prompt = [flatten_images(item) for item in images]
        return [image for prompt_images in per_prompt for image in prompt_images], [len(p) for p in per_prompt]
    flat = flatten_images(images)
    if not flat:
        raise ValueError("images is an empty list; pass at least one image, or images=None")
    return flat, None


def _as_batch_of_sequences(token_ids) -> list[list[int]]:
    if is_torch_available() and isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim not in (1, 2) or token_ids.dtype.kind not in "iu":
            raise ValueError(
                f"Expected integer token ids of shape (batch, sequence) or (sequence,), got {token_ids.dtype} "
                f"of shape {token_ids.shape}"
            )
        token_ids = token_ids.tolist()
    if isinstance(token_ids, (list, tuple)):
        if all(isinstance(token, (int, np.integer)) for token in token_ids):
            return [list(token_ids)]
        if all(isinstance(sequence, (list, tuple)) for sequence in token_ids):
            return [list(sequence) for sequence in token_ids]
    raise ValueError(f"Expected token ids of shape (batch, sequence) or (sequence,), got {_describe(token_ids)}")


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        inner = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {len(value)} ({', '.join(inner) or 'nothing'})"
    return type(value).__name__


__all__ = ["DualTokenProcessor", "default_chat_template"]
