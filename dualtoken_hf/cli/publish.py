"""`dualtoken export` and `dualtoken push`: a checked, complete Hub folder, then its upload."""

import sys

from ..hub.export import ExportCheckError, export_folder, push_folder


# A folder that fails its check is the user's to fix: one error line (the check's log with --debug).
EXPECTED_ERRORS = (ExportCheckError,)


def run_export(args) -> None:
    print(f"exporting {args.model_dir} to {args.output_dir}, then loading it without dualtoken_hf to check it")
    try:
        result = export_folder(args.model_dir, args.output_dir, args.pixel_decoder, args.license, args.overwrite)
    except ExportCheckError as error:
        if args.debug:
            print(error.log, file=sys.stderr)
        raise
    print(f"{result.folder} is a complete Hub folder ({result.kind}); it loads with trust_remote_code=True")


def run_push(args) -> None:
    url = push_folder(args.folder, args.repo_id, args.private, args.revision, args.token, args.commit_message)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
