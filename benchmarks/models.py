"""Random-weight models of the benchmarks, built from configs (nothing is downloaded), and the baselines beside them.

Sizes:
- the tokenizer is the full-size `paper` preset (SigLIP so400m at 384 px, 27 x 27 x 8 codes, K = 32768, C = 256);
- unified models keep the paper's code and head shapes (D = 8, C = 256, head width 1024, 3 layers) on a smaller LLM
  and grid, with a small SigLIP tower (its only role in generation is the grid size);
- `MID_LLM` is the mid-size LLM of the generation targets (12 layers x 768, Qwen2 architecture).
"""

import torch
from diffusers import VQModel
from torch import nn
from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, SiglipVisionModel

from dualtoken_hf import DualTokenConfig, DualTokenForConditionalGeneration, DualTokenVisionConfig, DualTokenVisionModel


MID_LLM = {
    "model_type": "qwen2",
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
PAPER_HEAD = {"num_layers": 3, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096}
PAPER_CODES = {"codebook_size": 32768, "code_dim": 256, "depth": 8}
PATCH = 8  # patch side of the small generation towers: grid side = image side / 8


def tokenizer_model(preset: str = "paper") -> DualTokenVisionModel:
    torch.manual_seed(0)
    return DualTokenVisionModel(DualTokenVisionConfig.from_preset(preset)).eval()


def unified_model(
    llm: dict | None = None, grid_side: int = 3, head: dict | None = None, codes: dict | None = None
) -> DualTokenForConditionalGeneration:
    """A unified model on the `tiny` preset with the given LLM, code grid, head shape and codebooks (both branches).

    `None` keeps the tiny preset's LLM, head or codebooks."""
    quantizer = codes or {}
    vision = DualTokenVisionConfig.from_preset(
        "tiny",
        siglip_config={"image_size": grid_side * PATCH, "patch_size": PATCH},
        pixel_quantizer_config=quantizer,
        semantic_quantizer_config=quantizer,
    )
    overrides = {"vision_config": vision}
    if llm is not None:
        overrides["text_config"] = llm
    if head is not None:
        overrides["depth_head_config"] = head
    torch.manual_seed(0)
    return DualTokenForConditionalGeneration(DualTokenConfig.from_preset("tiny", **overrides)).eval()


def generation_prompts(model: DualTokenForConditionalGeneration, batch: int, length: int = 8) -> torch.LongTensor:
    """`batch` prompts of `length` text tokens, each ending with begin-of-image (what the processor produces)."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, 256, (batch, length - 1), generator=generator)
    return torch.cat((text, torch.full((batch, 1), model.config.boi_token_id)), dim=1)


# ----------------------------------------------------------------------------------------------------- baselines


def siglip_tokens_floor(tokenizer: DualTokenVisionModel) -> SiglipVisionModel:
    """The tokenizer's own SigLIP blocks up to the semantic layer as a plain transformers `SiglipVisionModel` (no
    pooling head): the part of the tower that a tokens-only encode cannot skip. It shares the tokenizer's modules."""
    config = tokenizer.config.siglip_config.__class__(
        **{**tokenizer.config.siglip_config.to_dict(), "num_hidden_layers": tokenizer.config.semantic_layer}
    )
    config.vision_use_head = False
    with torch.device("meta"):
        floor = SiglipVisionModel(config)
    tower = tokenizer.siglip
    floor.embeddings = tower.embeddings
    floor.encoder.layers = nn.ModuleList(tower.encoder.layers[: tokenizer.config.semantic_layer])
    floor.post_layernorm = tower.post_layernorm
    return floor.eval()


def vqmodel_floor(tokenizer: DualTokenVisionModel) -> VQModel:
    """diffusers' `VQModel` with the pixel decoder's channels and blocks, for `VQModel.decode(latents,
    force_not_quantize=True)` on `(B, hidden_size, latent_size, latent_size)` latents.

    It is built on the meta device and then given the pixel decoder's own diffusers `Decoder` (the state-dict check
    below proves that the two have the same blocks) and a real 1 x 1 `post_quant_conv`; the encoder and quantizer,
    which that call never runs, are dropped."""
    decoder = tokenizer.pixel_decoder
    settings = decoder.config
    with torch.device("meta"):
        vqmodel = VQModel(
            in_channels=settings.out_channels,
            out_channels=settings.out_channels,
            down_block_types=("DownEncoderBlock2D",) * len(settings.block_out_channels),
            up_block_types=tuple(settings.up_block_types),
            block_out_channels=tuple(settings.block_out_channels),
            layers_per_block=settings.layers_per_block,
            act_fn="silu",
            latent_channels=settings.decoder_in_channels,
            norm_num_groups=settings.norm_num_groups,
            vq_embed_dim=settings.hidden_size,
            sample_size=settings.sample_size,
            mid_block_add_attention=True,
        )
    expected = {name: tuple(t.shape) for name, t in vqmodel.decoder.state_dict().items()}
    ours = {name: tuple(t.shape) for name, t in decoder.decoder.state_dict().items()}
    if expected != ours:
        raise RuntimeError("the pixel decoder's blocks differ from a VQModel decoder with the same settings")
    del vqmodel.encoder, vqmodel.quant_conv, vqmodel.quantize  # `decode(..., force_not_quantize=True)` skips them
    vqmodel.decoder = decoder.decoder
    weight = next(decoder.parameters())
    vqmodel.post_quant_conv = nn.Conv2d(
        settings.hidden_size, settings.decoder_in_channels, 1, device=weight.device, dtype=weight.dtype
    )
    return vqmodel.eval()


def janus_model(llm: dict, grid_side: int) -> JanusForConditionalGeneration:
    """transformers' Janus with a Llama LLM of the same size as `llm`, `grid_side`^2 image tokens, its real
    generation-head shape (LLM width -> projection -> K = 16384) and a minimal vision tower and VQ model."""
    hidden = llm["hidden_size"]
    text = {key: value for key, value in llm.items() if key != "model_type"}
    config = JanusConfig(
        text_config={**text, "model_type": "llama"},
        vision_config={
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": grid_side * 16,
            "patch_size": 16,
            "projection_dim": hidden,
            "num_image_tokens": grid_side**2,
        },
        vq_config={
            "base_channels": 32,
            "channel_multiplier": [1, 1],
            "num_res_blocks": 1,
            "image_token_embed_dim": hidden,
            "projection_dim": hidden,
        },
        image_token_id=llm["vocab_size"] - 1,
    )
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    vocab = llm["vocab_size"]
    model.generation_config = GenerationConfig(
        bos_token_id=vocab - 4, pad_token_id=vocab - 3, generation_kwargs={"boi_token_id": vocab - 2}
    )
    return model
