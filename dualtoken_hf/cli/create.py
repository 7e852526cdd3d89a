"""`dualtoken convert-official` and `dualtoken init`: write a new model folder."""

import torch

from ..convert.checkpoint import convert_official_folder, read_official_checkpoint
from ..hub.assemble import initialize_unified_folder
from ..hub.export import check_output_folder


def run_convert_official(args) -> None:
    check_output_folder(args.output_dir, args.overwrite)
    checkpoint = read_official_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    converted = convert_official_folder(
        checkpoint,
        args.output_dir,
        args.version,
        official_config=args.official_config,
        siglip_vision_config=args.siglip_config,
        keep_text_tower=args.keep_text_tower,
        siglip_text_config=args.siglip_text_config,
        license=args.license,
    )
    print(f"converted {args.checkpoint} ({args.version}) into {args.output_dir}")
    print(f"{len(converted.unused_keys)} official key(s) not used" + (":" if converted.unused_keys else ""))
    for key in converted.unused_keys:
        print(f"  {key}")


def run_init(args) -> None:
    check_output_folder(args.output_dir, args.overwrite)
    initialize_unified_folder(
        args.siglip,
        args.llm,
        args.output_dir,
        args.preset,
        args.seed,
        getattr(torch, args.dtype),
        args.license,
        allow_pickle=args.allow_pickle,
    )
    print(f"wrote an untrained {args.preset} model to {args.output_dir}")
