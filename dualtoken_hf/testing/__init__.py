"""Tiny, offline-built assets for tests, docs and benchmarks.

Everything here is built from code and a small embedded corpus, without network access or downloaded weights, and
is deterministic: two builds give the same tokenizer and processor. Not a Hub module (it may import the package).

- `build_tiny_text_tokenizer`: a byte-level BPE text tokenizer (512 ids) with the chat and image special tokens.
- `build_tiny_processor`: that tokenizer + the image processor of a tokenizer preset, as a `DualTokenProcessor`.
- `build_tiny_unified`: a complete random-weight tiny unified model + processor folder.
"""

import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import torch

from ..configuration_dualtoken import DualTokenConfig, DualTokenVisionConfig
from ..hub.cards import CardDetails
from ..hub.writing import save_unified_folder
from ..image_processing_dualtoken import DualTokenImageProcessor
from ..modeling_dualtoken import DualTokenForConditionalGeneration
from ..processing_dualtoken import DualTokenProcessor, default_chat_template


# Captions, questions and generation requests: the kinds of text the unified model reads (376 words).
TINY_TEXT_CORPUS = """\
A red fox jumps over a lazy brown dog in the green field.
A small grey cat sleeps on a blue chair near the open window.
Two children play with a yellow ball on the sandy beach at sunset.
An astronaut in a white suit stands next to the flag on the moon.
A cup of hot coffee sits on a wooden table beside a plate of cookies.
A tall rocket launches into the clear morning sky, leaving a trail of smoke.
The old castle on the hill is surrounded by tall pine trees and a stone wall.
A man rides a bicycle along a quiet street lined with colorful houses.
A woman holds an umbrella while walking through the rain in the city.
Three horses graze in a meadow full of purple and white flowers.
A bowl of fresh fruit with apples, oranges, bananas and grapes.
A black and white photo of a train crossing a bridge over a river.
The mountain peak is covered with snow under a bright blue sky.
A little boat floats on the calm lake, reflecting the orange clouds.
A dog catches a frisbee in the park while people watch and smile.
Describe this image in detail. What objects can you see in the picture?
What color is the car parked in front of the building?
How many people are sitting at the table, and what are they eating?
Generate an image of a cozy cabin in the snowy forest at night.
Draw a painting of a lighthouse on a rocky coast during a storm.
The picture shows a kitchen with a stove, a sink and many shelves.
There is a large clock on the wall of the train station.
A bird with bright feathers perches on a branch of the cherry tree.
The street market is busy with vendors selling vegetables and bread.
A close-up photograph of a butterfly resting on a sunflower.
Answer the question about the image: is it day or night?
The image contains a person, a bicycle and a traffic light.
A plate of pasta with tomato sauce, basil leaves and grated cheese.
A snowy owl flies low over the frozen field in the early morning light.
Please write a short caption for this photo.
"""

# Byte-level BPE ids 0..505, then the special tokens in Qwen2.5's order (chat markers, end of text, image tokens), so
# that they take the last ids of a 512-id vocabulary, as in `DualTokenConfig.from_preset("tiny")`.
TINY_BPE_VOCAB_SIZE = 506
TINY_SPECIAL_TOKENS = {
    "im_start": "<|im_start|>",  # 506
    "im_end": "<|im_end|>",  # 507
    "eos_token": "<|endoftext|>",  # 508, also the padding token
    "image_token": "<image>",  # 509
    "boi_token": "<begin_of_image>",  # 510
    "eoi_token": "<end_of_image>",  # 511
}


def build_tiny_text_tokenizer(save_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """
    Train a tiny byte-level BPE tokenizer on `TINY_TEXT_CORPUS` (milliseconds, offline, deterministic).

    Ids 0..505 are byte-level BPE tokens; 506..511 are the added special tokens `<|im_start|>`, `<|im_end|>`,
    `<|endoftext|>` (end of text and padding), `<image>`, `<begin_of_image>` and `<end_of_image>`. The image tokens
    are also the tokenizer's `image_token`, `boi_token` and `eoi_token` attributes; the chat template is
    [`default_chat_template`] (ChatML).

    Args:
        save_dir (`str` or `os.PathLike`, *optional*):
            If given, the tokenizer is saved there (`AutoTokenizer.from_pretrained(save_dir)` reloads it).

    Returns:
        `PreTrainedTokenizerFast` with 512 ids, returning `input_ids` and `attention_mask`.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_TEXT_CORPUS.splitlines(), trainer)
    if backend.get_vocab_size() != TINY_BPE_VOCAB_SIZE:
        raise RuntimeError(
            f"the tiny corpus gave {backend.get_vocab_size()} BPE tokens, expected {TINY_BPE_VOCAB_SIZE}"
        )
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in TINY_SPECIAL_TOKENS.values()]
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=TINY_SPECIAL_TOKENS["eos_token"],
        pad_token=TINY_SPECIAL_TOKENS["eos_token"],
        image_token=TINY_SPECIAL_TOKENS["image_token"],
        boi_token=TINY_SPECIAL_TOKENS["boi_token"],
        eoi_token=TINY_SPECIAL_TOKENS["eoi_token"],
        extra_special_tokens=[TINY_SPECIAL_TOKENS["im_start"], TINY_SPECIAL_TOKENS["im_end"]],
        model_input_names=["input_ids", "attention_mask"],
        chat_template=default_chat_template(TINY_SPECIAL_TOKENS["image_token"]),
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_tiny_processor(
    save_dir: str | os.PathLike | None = None, image_preset: str = "tiny"
) -> DualTokenProcessor:
    """
    A `DualTokenProcessor` made of [`build_tiny_text_tokenizer`] and the image processor of a tokenizer preset.

    Args:
        save_dir (`str` or `os.PathLike`, *optional*):
            If given, the processor (tokenizer, image processor, chat template) is saved there.
        image_preset (`str`, *optional*, defaults to `"tiny"`):
            Tokenizer preset (`"tiny"`, `"paper"`, `"v2"`) that sets the image size and `num_image_tokens`
            (its grid side squared: 8 × 8 = 64 for `"tiny"`, 27 × 27 = 729 for the 384 px presets).

    Returns:
        `DualTokenProcessor`.
    """
    vision_config = DualTokenVisionConfig.from_preset(image_preset)
    processor = DualTokenProcessor(
        image_processor=DualTokenImageProcessor.from_vision_config(vision_config),
        tokenizer=build_tiny_text_tokenizer(),
        num_image_tokens=vision_config.grid_size**2,
    )
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor


def build_tiny_unified(save_dir: str | os.PathLike, seed: int = 0, **config_overrides) -> str:
    """
    Write a complete random-weight tiny unified model + processor folder and return its path.

    The folder holds sharded safetensors, remote code, the generation config (guidance 3), the processor with the
    tiny tokenizer (built offline), the DualToken pipelines and a model card; it loads without this package
    installed.

    Args:
        save_dir: where to write the folder.
        seed: seed of the random weights.
        config_overrides: passed to `DualTokenConfig.from_preset("tiny", ...)` (e.g. `text_config={...}`).
    """
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    token_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "image_token_id": processor.image_token_id,
        "boi_token_id": processor.boi_token_id,
        "eoi_token_id": processor.eoi_token_id,
    }
    torch.manual_seed(seed)
    model = DualTokenForConditionalGeneration(DualTokenConfig.from_preset("tiny", **token_ids, **config_overrides))
    # Chat replies end with <|im_end|>, plain text with <|endoftext|>.
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(TINY_SPECIAL_TOKENS["im_end"]),
                                            tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    card = CardDetails(origin="Random weights from `dualtoken_hf.testing.build_tiny_unified`, for tests and demos.")
    return save_unified_folder(model, processor, save_dir, card=card, max_shard_size="1MB")


__all__ = [
    "TINY_SPECIAL_TOKENS",
    "TINY_TEXT_CORPUS",
    "build_tiny_processor",
    "build_tiny_text_tokenizer",
    "build_tiny_unified",
]
