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
"""Pipelines for the unified DualToken model: "text-to-image", and "any-to-any" without a torchvision check.

transformers has no "text-to-image" task, so this module registers one with `PIPELINE_REGISTRY`. A saved model
folder lists both pipelines in `config.json` (`custom_pipelines`) and ships this file, so
`pipeline("text-to-image", model=folder, trust_remote_code=True)` works where the package is not installed.
"""

import torch
from transformers import AutoModelForMultimodalLM, Pipeline
from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.any_to_any import AnyToAnyPipeline
from transformers.utils import requires_backends


GENERATION_ARGUMENTS = (
    "guidance_scale",
    "temperature",
    "top_k",
    "top_p",
    "do_sample",
    "num_images_per_prompt",
    "use_depth_cache",
    "progress_bar",
    "callback",
)


class DualTokenTextToImagePipeline(Pipeline):
    """
    Text-to-image with a DualToken model: `pipe("a red fox", guidance_scale=3.0, seed=0, num_images_per_prompt=1)`
    returns `[{"input_text": "a red fox", "generated_image": PIL.Image}, ...]` (one dict per image).

    Call arguments: `guidance_scale` (paper: 3), `seed` (a fixed seed gives the same images), `num_images_per_prompt`,
    `temperature`, `top_k`, `top_p` (one value or one per depth), `do_sample`, `use_depth_cache`, `progress_bar`,
    `callback(done_positions, total_positions)`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, seed=None, **kwargs):
        unknown = sorted(set(kwargs) - set(GENERATION_ARGUMENTS))
        if unknown:
            raise TypeError(f"text-to-image got unexpected arguments {unknown}; allowed: seed, {GENERATION_ARGUMENTS}")
        forward_params = {key: value for key, value in kwargs.items() if value is not None}
        if seed is not None:
            forward_params["seed"] = seed
        return {}, forward_params, {}

    def preprocess(self, prompt):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"text-to-image needs a non-empty string prompt, got {prompt!r}")
        inputs = self.processor(text=[prompt], generation_mode="image", return_tensors="pt")
        inputs["prompt"] = prompt
        return inputs

    def _forward(self, model_inputs, seed=None, **generate_kwargs):
        prompt = model_inputs.pop("prompt")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        pixel_codes = self.model.generate(
            **model_inputs, generation_mode="image", generator=generator, **generate_kwargs
        )
        return {"images": self.model.decode_image_tokens(pixel_codes), "prompt": prompt}

    def postprocess(self, model_outputs):
        images = self.processor.postprocess(model_outputs["images"].float())
        return [{"input_text": model_outputs["prompt"], "generated_image": image} for image in images]


class DualTokenAnyToAnyPipeline(AnyToAnyPipeline):
    """transformers' "any-to-any" pipeline for DualToken models.

    Two differences from the built-in: DualToken's processor is PIL/numpy only, so the torchvision requirement is
    dropped; and `generation_mode` also reaches the processor, which builds image-generation prompts for
    `generation_mode="image"`.
    """

    def __init__(self, *args, **kwargs):
        Pipeline.__init__(self, *args, **kwargs)
        requires_backends(self, "vision")
        self.check_model_type(MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)

    def _sanitize_parameters(self, *args, generation_mode=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(
            *args, generation_mode=generation_mode, **kwargs
        )
        if generation_mode is not None:
            # processor_kwargs reach the processor on both the plain-text and the chat-template path.
            preprocess_params.setdefault("processor_kwargs", {})["generation_mode"] = generation_mode
        return preprocess_params, forward_params, postprocess_params


CUSTOM_PIPELINES = {
    "text-to-image": DualTokenTextToImagePipeline,
    "any-to-any": DualTokenAnyToAnyPipeline,
}


def register_pipelines():
    """Register the "text-to-image" task (and the DualToken "any-to-any" variant is used through `config.json`)."""
    PIPELINE_REGISTRY.register_pipeline(
        "text-to-image", pipeline_class=DualTokenTextToImagePipeline, pt_model=AutoModelForMultimodalLM, type="multimodal"
    )


def custom_pipelines_entry() -> dict:
    """The `custom_pipelines` dict of a saved model's `config.json` that points at this module's pipelines."""
    module = __name__.rsplit(".", 1)[-1]
    return {
        task: {"impl": f"{module}.{cls.__name__}", "pt": ["AutoModelForMultimodalLM"], "type": "multimodal"}
        for task, cls in CUSTOM_PIPELINES.items()
    }


__all__ = [
    "DualTokenAnyToAnyPipeline",
    "DualTokenTextToImagePipeline",
    "custom_pipelines_entry",
    "register_pipelines",
]
