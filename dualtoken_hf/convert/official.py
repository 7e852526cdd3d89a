"""Convert the official DualToken tokenizer (RQVAESiglipModel) checkpoints into `DualTokenVisionModel`.

Two official layouts exist (see the reference README): `"paper"` (the 2025 release, "v1": conv ResNet-block
projections, one quantizer config for both branches, fixed tap offsets) and `"v2"` (attention projections, a
shortcut, a config dict per branch). The SigLIP text tower and the contrastive logit scale/bias are dropped.
"""

import torch

from ..configuration_dualtoken import BRANCHES, DualTokenQuantizerConfig, DualTokenVisionConfig
from .contents import unpack_checkpoint
from .official_keys import convert_official_decoder, convert_official_projection


VERSIONS = ("paper", "v2")
SIGLIP_PREFIX = "siglip_model.vision_model."
DROPPED_PREFIXES = ("siglip_model.text_model.", "siglip_model.logit_scale", "siglip_model.logit_bias")

# official module name -> ours, per version
PROJECTIONS = {
    "paper": {
        "prequant_visual": "pixel_projection",
        "prequant_semantic": "semantic_projection",
        "postquant_semantic": "semantic_up_projection",
    },
    "v2": {
        "prequant_pix": "pixel_projection",
        "prequant_shortcut": "shortcut_projection",
        "prequant_sem": "semantic_projection",
        "postquant_sem": "semantic_up_projection",
    },
}
# branch -> official quantizer module, per version; ours are `pixel_quantizer` and `semantic_quantizer`
QUANTIZERS = {
    "paper": {"pixel": "quantizer", "semantic": "quantizer_semantic"},
    "v2": {"pixel": "quantizer_pix", "semantic": "quantizer_sem"},
}
OUR_QUANTIZERS = {"pixel": "pixel_quantizer", "semantic": "semantic_quantizer"}
# The pixel decoder's official modules: the post-quant projection, the post-quant ResNet block and the conv decoder.
DECODER_MODULES = {
    "paper": ("postquant_visual", "post_quant_conv", "decoder"),
    "v2": ("postquant_pix", "post_quant_conv", "decoder"),
}
# v1 taps sit at fixed 0-based offsets from the last block; towers shorter than the offset cannot run the
# official code, and the reference tiny build used offset 4 instead (reference README §2, patch C).
V1_PIXEL_OFFSET, V1_SHORT_TOWER_PIXEL_OFFSET, V1_SEMANTIC_OFFSET = 22, 4, 2


# official optional quantizer setting -> ours; one the official config leaves out takes `DualTokenQuantizerConfig`'s
# default (the released configs state all three)
OPTIONAL_QUANTIZER_SETTINGS = {
    "shared_codebook": "shared_codebook",
    "decay": "ema_decay",
    "restart_unused_codes": "restart_dead_codes",
}


def _quantizer_settings(official: dict, ema_update_per_depth: bool, ema_sum_clamp) -> dict:
    settings = {
        "codebook_size": official["n_embed"],
        "code_dim": official["embed_dim"],
        "depth": official["code_shape"][-1],
        "ema_update_per_depth": ema_update_per_depth,
        "ema_sum_clamp": ema_sum_clamp,
    }
    settings.update({ours: official[key] for key, ours in OPTIONAL_QUANTIZER_SETTINGS.items() if key in official})
    return settings


def _decoder_settings(ddconfig: dict, latent_shape, image_size: int) -> dict:
    levels = len(ddconfig["ch_mult"])
    lowest = ddconfig["resolution"] // 2 ** (levels - 1)
    if ddconfig["resolution"] != image_size:
        raise ValueError(f"decoder resolution {ddconfig['resolution']} differs from the image size {image_size}")
    if list(ddconfig.get("attn_resolutions", [lowest])) != [lowest]:
        raise ValueError(f"only attention at the lowest decoder resolution ({lowest}) is supported, got {ddconfig}")
    if latent_shape is not None and list(latent_shape) != [lowest, lowest]:
        raise ValueError(f"decoder_latent_shape {latent_shape} must equal the lowest resolution ({lowest})")
    return {
        "decoder_in_channels": ddconfig["decoder_in_channels"],
        "block_out_channels": [ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
        "layers_per_block": ddconfig["num_res_blocks"],
        "out_channels": ddconfig.get("out_ch", 3),
    }


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")


def official_config_to_hf(
    version: str, official_config: dict | None = None, siglip_vision_config: dict | None = None
) -> DualTokenVisionConfig:
    """Our config for an official layout. `None` configs mean the full-size official release of `version`."""
    _check_version(version)
    if official_config is None:
        return DualTokenVisionConfig.from_preset(
            version, **({"siglip_config": siglip_vision_config} if siglip_vision_config else {})
        )
    siglip = dict(siglip_vision_config or DualTokenVisionConfig().siglip_config.to_dict())
    siglip.pop("model_type", None)
    image_size = siglip["image_size"]
    if version == "paper":
        num_layers = siglip["num_hidden_layers"]
        pixel_offset = V1_PIXEL_OFFSET if num_layers >= V1_PIXEL_OFFSET else V1_SHORT_TOWER_PIXEL_OFFSET
        quantizer = _quantizer_settings(official_config, True, 1000.0)
        layout = {
            "projection_type": "resconv",
            "pixel_layer": num_layers - pixel_offset + 1,
            "semantic_layer": num_layers - V1_SEMANTIC_OFFSET + 1,
            "shortcut_layer": None,
            "pixel_quantizer_config": quantizer,
            "semantic_quantizer_config": dict(quantizer),
        }
    else:
        layout = {
            "projection_type": "attention",
            "pixel_layer": official_config["layer_recon"],
            "semantic_layer": official_config["layer_sem"],
            "shortcut_layer": official_config.get("layer_shortcut"),
            "shortcut_weight": official_config.get("weight_shortcut", 0.6),
            "pixel_quantizer_config": _quantizer_settings(
                official_config["vq_pix"], official_config["vq_pix"]["bottleneck_type"] == "rq", None
            ),
            "semantic_quantizer_config": _quantizer_settings(
                official_config["vq_sem"], official_config["vq_sem"]["bottleneck_type"] == "rq", None
            ),
        }
    decoder = _decoder_settings(official_config["ddconfig"], official_config.get("decoder_latent_shape"), image_size)
    return DualTokenVisionConfig(siglip_config=siglip, decoder_config=decoder, semantic_feedback=True, **layout)


def _convert_quantizer(state_dict: dict, prefix: str, settings: DualTokenQuantizerConfig) -> dict:
    """Official per-depth tables (K+1 rows, the last a zero padding row) -> one table per distinct codebook."""
    depth, size = settings.depth, settings.codebook_size
    tables = {}
    for name, rows in (("weight", size), ("embed_ema", size), ("cluster_size_ema", size)):
        per_depth = []
        for d in range(depth):
            key = f"{prefix}.codebooks.{d}.{name}"
            if key not in state_dict:
                raise KeyError(f"the checkpoint lacks the official key {key}")
            per_depth.append(state_dict[key][:rows])
        if settings.shared_codebook:
            if any(not torch.equal(per_depth[0], t) for t in per_depth[1:]):
                raise ValueError(f"{prefix} is configured as a shared codebook but its depth copies of {name} differ")
            per_depth = per_depth[:1]
        tables[name] = torch.stack(per_depth)
    return {"codebook": tables["weight"], "embed_ema": tables["embed_ema"], "cluster_size_ema": tables["cluster_size_ema"]}


def _prefixes(module_names) -> tuple[str, ...]:
    return tuple(f"{name}." for name in module_names)


def official_module_prefixes(version: str) -> tuple[str, ...]:
    """Key prefixes of every official module that `official_to_hf` converts or drops for `version`."""
    return (
        SIGLIP_PREFIX,
        *DROPPED_PREFIXES,
        *_prefixes(PROJECTIONS[version]),
        *_prefixes(QUANTIZERS[version].values()),
        *_prefixes(DECODER_MODULES[version]),
    )


def check_layout(state_dict: dict, version: str) -> None:
    """Raise `ValueError` when the official state has the other version's layout (told by its pixel codebooks), or
    `version` is none of `VERSIONS`."""
    _check_version(version)

    def has_codebooks_of(layout: str) -> bool:
        return f"{QUANTIZERS[layout]['pixel']}.codebooks.0.weight" in state_dict

    for other in VERSIONS:
        if other != version and has_codebooks_of(other) and not has_codebooks_of(version):
            raise ValueError(
                f"the checkpoint has the official {other!r} layout, not {version!r} (it holds "
                f"{QUANTIZERS[other]['pixel']}.codebooks.*): convert it with version={other!r} (command line: "
                f"--version {other})"
            )


def config_hint(version: str, official_config, siglip_vision_config) -> str:
    """What a key or shape mismatch between an official state and the config it was read with most likely means."""
    if official_config is None or siglip_vision_config is None:
        absent = "official config" if official_config is None else "SigLIP vision config"
        return (
            f"no {absent} was given, so the full-size {version!r} release was assumed: pass the configs stored with "
            "the checkpoint (`load_official_checkpoint(path)` returns them, the command line reads them itself) or "
            "the ones it was trained with (command line: --official-config, --siglip-config)"
        )
    return "the checkpoint does not match the given configs: check that they are the ones it was trained with"


def _convert_state(source: dict, version: str, config: DualTokenVisionConfig) -> dict:
    """The official state (no `module.` prefixes) renamed and reshaped to ours; `KeyError` names a missing or
    left-over official key."""
    converted, used = {}, set()

    for key, value in source.items():
        if key.startswith(SIGLIP_PREFIX):
            converted["siglip." + key[len(SIGLIP_PREFIX) :]] = value
            used.add(key)
        elif key.startswith(DROPPED_PREFIXES):
            used.add(key)

    for official, ours in PROJECTIONS[version].items():
        if ours == "shortcut_projection" and config.shortcut_layer is None:
            continue
        module_state = convert_official_projection(source, official, config.projection_type)
        converted.update({f"{ours}.{key}": value for key, value in module_state.items()})
        used.update(key for key in source if key.startswith(official + "."))

    for branch in BRANCHES:
        official, ours = QUANTIZERS[version][branch], OUR_QUANTIZERS[branch]
        module_state = _convert_quantizer(source, official, config.quantizer_config(branch))
        converted.update({f"{ours}.{key}": value for key, value in module_state.items()})
        used.update(key for key in source if key.startswith(official + "."))

    decoder_state = convert_official_decoder(
        source,
        "v1" if version == "paper" else "v2",
        num_levels=len(config.decoder_config.block_out_channels),
        layers_per_block=config.decoder_config.layers_per_block,
    )
    converted.update({f"pixel_decoder.{key}": value for key, value in decoder_state.items()})
    used.update(key for key in source if key.startswith(_prefixes(DECODER_MODULES[version])))

    leftover = sorted(set(source) - used)
    if leftover:
        raise KeyError(f"{len(leftover)} official keys belong to no known module: {leftover[:10]}")
    return converted


def official_to_hf(
    state_dict: dict,
    version: str = "paper",
    official_config: dict | None = None,
    siglip_vision_config: dict | None = None,
) -> tuple[DualTokenVisionConfig, dict]:
    """Map an official checkpoint to our config and state dict.

    Args:
        state_dict: the official model's state dict (RQVAESiglipModel keys; DDP's `module.` prefixes are stripped),
            e.g. from [`load_official_checkpoint`], or a whole training checkpoint dict as `torch.load` gives it
            (`{"state_dict": ..., "rqvaesiglip_config": ..., "siglip_vision_config": ...}`), whose stored configs
            are then used unless given here.
        version: `"paper"` (the 2025 release) or `"v2"` (later official code).
        official_config: the official config dict (v2: the `rqvaesiglip` dict; paper: the top-level quantizer
            dict of `model_config/config.json`). `None` means the checkpoint's own, else the full-size release.
        siglip_vision_config: the SigLIP vision config dict. `None` means the checkpoint's own, else SigLIP
            so400m-patch14-384.

    Returns:
        `(config, state_dict)` ready for `DualTokenVisionModel(config).load_state_dict(state_dict)`.

    Raises:
        ValueError: an official key the layout needs is missing, or keys are left that belong to no known module
            (the message names the key and says what it likely means: another `version`, or configs that are not
            the checkpoint's), or `official_config` lacks an entry the layout needs.
    """
    source, stored = unpack_checkpoint(state_dict, "the checkpoint")
    official_config = official_config or stored.get("rqvaesiglip_config")
    siglip_vision_config = siglip_vision_config or stored.get("siglip_vision_config")
    check_layout(source, version)
    try:
        config = official_config_to_hf(version, official_config, siglip_vision_config)
    except KeyError as error:
        raise ValueError(
            f"official_config lacks the entry {error.args[0]!r} that the official {version!r} layout needs (v2: "
            "the rqvaesiglip dict; paper: the quantizer dict of model_config/config.json)"
        ) from error
    try:
        return config, _convert_state(source, version, config)
    except KeyError as error:
        raise ValueError(f"{error.args[0]}; {config_hint(version, official_config, siglip_vision_config)}") from error


__all__ = [
    "VERSIONS",
    "check_layout",
    "config_hint",
    "official_config_to_hf",
    "official_module_prefixes",
    "official_to_hf",
]
