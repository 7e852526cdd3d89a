"""Assemble an untrained unified model as the paper does: tokenizer tower from SigLIP, LLM from a pretrained
causal LM, new image projector and depth heads, and the text tokenizer extended with the image special tokens.

Not a Hub module (it may import the package). `dualtoken init` wraps [`initialize_unified`].
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..configuration_dualtoken import UNIFIED_PRESETS, DualTokenConfig
from ..image_processing_dualtoken import DualTokenImageProcessor
from ..modeling_dualtoken import DualTokenForConditionalGeneration
from ..modeling_dualtoken_vision import DualTokenVisionModel
from ..processing_dualtoken import DualTokenProcessor
from .cards import CardDetails
from .writing import save_unified_folder


IMAGE_TOKENS = {"image_token": "<image>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}


def extend_text_tokenizer(tokenizer) -> dict[str, int]:
    """
    Add the image tokens (`<image>`, `<begin_of_image>`, `<end_of_image>`) to a text tokenizer as special tokens
    (tokens it has already are kept) and give it a padding token (its end-of-text token when it has none).

    Returns:
        The config's token ids: `image_token_id`, `boi_token_id`, `eoi_token_id` and `pad_token_id`.
    """
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(IMAGE_TOKENS.values())}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the text tokenizer ({type(tokenizer).__name__}) has neither a padding nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()}
    return {**ids, "pad_token_id": tokenizer.pad_token_id}


@contextmanager
def _naming_checkpoint(role: str, path) -> Iterator[None]:
    """Prefix loading failures (transformers' messages do not always say which checkpoint) with the checkpoint."""
    try:
        yield
    except OSError as error:
        raise OSError(f"cannot load the {role} checkpoint {str(path)!r}: {error}") from error


def _check_preset(preset: str) -> None:
    if preset not in UNIFIED_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(UNIFIED_PRESETS)}")


def _copy_weights(target: torch.nn.Module, source: torch.nn.Module, name: str) -> None:
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the {name} weights do not fit the assembled model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def initialize_unified(
    siglip: str | os.PathLike,
    llm: str | os.PathLike,
    preset: str = "dualtoken-3b",
    seed: int = 0,
    allow_pickle: bool = False,
) -> tuple[DualTokenForConditionalGeneration, DualTokenProcessor]:
    """
    Build an untrained unified model and its processor from a pretrained SigLIP tower and a pretrained causal LM.

    Args:
        siglip: A SigLIP (or SigLIP vision) checkpoint, e.g. `google/siglip-so400m-patch14-384`, for the tokenizer's
            tower; the projections, codebooks and pixel decoder start from random initialisation.
        llm: A causal LM checkpoint with its tokenizer, e.g. `Qwen/Qwen2.5-3B`; any `AutoModelForCausalLM` works.
        preset: `DualTokenConfig` preset for the tokenizer layout and the depth heads (`"dualtoken-3b"`: the paper
            tokenizer; `"tiny"`: tests and demos).
        seed: Seed of the new weights (projector, depth heads, tokenizer projections, codebooks, decoder).
        allow_pickle: Also read pickled `.bin` weights when a checkpoint has no safetensors files (they can run code
            when loaded: trusted checkpoints only); by default only safetensors weights are read.

    Returns:
        `(model, processor)`; save them with `dualtoken_hf.hub.save_unified_folder`. The LLM's token embeddings
        grow when the image tokens do not fit its vocabulary.
    """
    _check_preset(preset)
    torch.manual_seed(seed)
    vision_preset = UNIFIED_PRESETS[preset]["vision_preset"]
    with _naming_checkpoint("SigLIP", siglip):
        vision_tokenizer = DualTokenVisionModel.from_siglip(
            siglip, preset=vision_preset, use_safetensors=not allow_pickle
        )
    return assemble_unified(vision_tokenizer, llm, preset, allow_pickle)


def assemble_unified(
    vision_tokenizer: DualTokenVisionModel,
    llm: str | os.PathLike,
    preset: str = "dualtoken-3b",
    allow_pickle: bool = False,
    gguf_file: str | None = None,
) -> tuple[DualTokenForConditionalGeneration, DualTokenProcessor]:
    """
    Build a unified model and its processor around a vision tokenizer (e.g. a trained one) and a pretrained causal
    LM: the image projector and depth heads are new (seed torch first), sized by `preset`; the tokenizer layout is
    `vision_tokenizer`'s. `gguf_file` names a GGUF file in `llm` to read the LLM and its text tokenizer from
    (transformers dequantizes it to float32). Other arguments and returns as [`initialize_unified`].
    """
    _check_preset(preset)
    with _naming_checkpoint("LLM", llm):
        if gguf_file is None:
            language_model = AutoModelForCausalLM.from_pretrained(llm, use_safetensors=not allow_pickle)
        else:
            language_model = AutoModelForCausalLM.from_pretrained(llm, gguf_file=gguf_file, dtype=torch.float32)
            # The weights are dequantized now; a config that still names the GGUF quantization would make
            # transformers refuse to save the unified model ("quantized with gguf and is not serializable").
            del language_model.config.quantization_config
        text_tokenizer = AutoTokenizer.from_pretrained(llm, gguf_file=gguf_file)
    token_ids = extend_text_tokenizer(text_tokenizer)
    if len(text_tokenizer) > language_model.config.vocab_size:
        language_model.resize_token_embeddings(len(text_tokenizer))

    config = DualTokenConfig.from_preset(
        preset, text_config=language_model.config, vision_config=vision_tokenizer.config, **token_ids
    )
    model = DualTokenForConditionalGeneration(config)
    _copy_weights(model.language_model, language_model.base_model, "LLM")
    _copy_weights(model.lm_head, language_model.get_output_embeddings(), "LM head")
    _copy_weights(model.vision_tokenizer, vision_tokenizer, "SigLIP tokenizer")
    model.generation_config.eos_token_id = language_model.generation_config.eos_token_id or text_tokenizer.eos_token_id
    model.generation_config.pad_token_id = token_ids["pad_token_id"]

    processor = DualTokenProcessor(
        image_processor=DualTokenImageProcessor.from_vision_config(config),
        tokenizer=text_tokenizer,
        num_image_tokens=config.num_image_tokens,
        **IMAGE_TOKENS,
    )
    return model.eval(), processor


def initialize_unified_folder(
    siglip: str | os.PathLike,
    llm: str | os.PathLike,
    output_dir: str | os.PathLike,
    preset: str = "dualtoken-3b",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    license: str = "apache-2.0",
    allow_pickle: bool = False,
) -> DualTokenForConditionalGeneration:
    """[`initialize_unified`], then save model (in `dtype`) and processor as a Hub-ready folder with a model card."""
    model, processor = initialize_unified(siglip, llm, preset, seed, allow_pickle)
    model.to(dtype)
    card = CardDetails(
        origin=(
            "Initialised as in the paper with `dualtoken init`: the tokenizer tower comes from SigLIP and the LLM "
            "from a pretrained causal LM; the image projector, depth heads, quantizers and pixel decoder are untrained."
        ),
        facts={"SigLIP tower": f"`{siglip}`", "LLM": f"`{llm}`", "preset": preset, "seed": seed, "dtype": str(dtype)},
        license=license,
    )
    save_unified_folder(model, processor, output_dir, card=card)
    return model


__all__ = [
    "IMAGE_TOKENS",
    "assemble_unified",
    "extend_text_tokenizer",
    "initialize_unified",
    "initialize_unified_folder",
]
