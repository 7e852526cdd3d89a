"""A dependency-free Accelerate tracker: one JSON object per `accelerator.log` call, appended to a file."""

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker


class JSONLinesTracker(GeneralTracker):
    """
    Appends `{"step": step, **values}` lines to `<logging_dir>/<run_name>.jsonl` (and the run configuration to
    `<run_name>_config.json`). Appending means a resumed run continues the same file. Always available, so every
    run keeps a readable record of its losses even where TensorBoard or W&B are not installed. `Accelerator.log`
    calls it on the main process only.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.run_name = run_name
        self.logging_dir = Path(logging_dir)
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.logging_dir / f"{run_name}.jsonl"

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        (self.logging_dir / f"{self.run_name}_config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")

    def truncate(self, step: int):
        """Keep only the records of steps up to `step`: a run resumed from the checkpoint of `step` logs the later
        ones again, so its file then reads as that of an uninterrupted run. Also drops a line cut off by a crash."""
        if not self.path.is_file():
            return
        kept = [record for record in read_jsonl(self.path) if record["step"] is None or record["step"] <= step]
        partial = self.path.with_name(f"{self.path.name}.tmp")
        partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
        partial.replace(self.path)


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a `JSONLinesTracker` file, except a last line without its newline (a write cut off by a
    crash)."""
    lines = Path(path).read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]
