"""A code file written a batch at a time, so that `dualtoken tokenize` holds one batch of images in memory whatever
their number, and an interrupted run resumes where it stopped.

While a run goes on, each batch's codes are a code file of their own (`save_codes`) in a progress folder beside the
output, `<output>.partial/`: `run.json` there names the images to tokenize and the model, and `parts.jsonl` gets one
line per batch file once that file is complete (written under a temporary name, then renamed). Appending keeps the
record's cost per batch constant however long the run; a crash while appending leaves an unterminated last line,
which does not count. When the last batch is in, `finish` joins the batch files into the output, one at a time
(`join_code_files`), and removes the folder. `PartialCodes.start(..., resume=True)` over the same images
and model continues an unfinished run: the images of its complete batches are not tokenized again.
"""

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import join_code_files, save_codes


PARTIAL_SUFFIX = ".partial"
RUN_FILE = "run.json"
PARTS_FILE = "parts.jsonl"


def partial_folder(output: str | os.PathLike) -> Path:
    """The progress folder of the code file `output`: `<output>.partial/` beside it."""
    output = Path(output)
    return output.with_name(output.name + PARTIAL_SUFFIX)


def _replace_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, then rename the result to `path`."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def _read_parts(path: Path) -> list[dict]:
    """The complete lines of a `parts.jsonl` (each ends with a newline; an unterminated last line is dropped)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


@dataclass
class PartialCodes:
    """An unfinished code file: the images it will hold (`sources`), the model that tokenizes them and the batch
    files complete so far (`parts`, each `{"file": name, "images": count}`, plus `"skipped": [names]` for the images
    of that batch that could not be read) in `folder`. `fingerprint` (the tokenizer's) goes into every batch file."""

    folder: Path
    sources: list[str]
    model: str
    parts: list[dict] = field(default_factory=list)
    fingerprint: dict | None = None

    @property
    def done(self) -> int:
        """How many images (the first ones of `sources`) have their codes saved, or were skipped as unreadable."""
        return sum(part["images"] for part in self.parts)

    @property
    def skipped(self) -> list[str]:
        """The images passed over because they could not be read."""
        return [name for part in self.parts for name in part.get("skipped", [])]

    @classmethod
    def start(cls, output: str | os.PathLike, sources: list[str], model: str, resume: bool) -> "PartialCodes":
        """
        The progress of the code file `output` for the images `sources` tokenized by `model`: a new one, or with
        `resume` the unfinished run left in its progress folder, whose complete batches must be of the first images
        of `sources`, by the same model. Without `resume`, an unfinished run there is an error (never overwritten);
        one that saved no batch is started over.
        """
        folder = partial_folder(output)
        partial = cls._read(folder)
        if partial is None or partial.done == 0:
            folder.mkdir(parents=True, exist_ok=True)
            partial = cls(folder, list(sources), model)
            partial._save_run()
            return partial
        if not resume:
            raise FileExistsError(
                f"{str(folder)!r} holds an unfinished run ({partial.done} of {len(partial.sources)} images "
                "tokenized): pass --resume to continue it, or delete that folder to start over"
            )
        partial._check_continues(sources, model)
        partial.sources = list(sources)
        partial._save_run()
        return partial

    @classmethod
    def _read(cls, folder: Path) -> "PartialCodes | None":
        run = folder / RUN_FILE
        if not run.is_file():
            return None
        try:
            saved = json.loads(run.read_text())
            return cls(folder, saved["sources"], saved["model"], _read_parts(folder / PARTS_FILE))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{str(folder)!r} holds a damaged record ({error}); delete it to start over") from error

    def _check_continues(self, sources: list[str], model: str) -> None:
        if model != self.model:
            raise ValueError(
                f"the unfinished run in {str(self.folder)!r} used the model {self.model!r}, not {model!r}: resume it "
                "with the same --model, or delete that folder to start over"
            )
        finished = self.sources[: self.done]
        if list(sources[: self.done]) != finished:
            first = next(index for index, name in enumerate(finished) if sources[index : index + 1] != [name])
            raise ValueError(
                f"the unfinished run in {str(self.folder)!r} tokenized other images: its image {first} is "
                f"{finished[first]!r}; resume it with the same images, or delete that folder to start over"
            )
        missing = [part["file"] for part in self.parts if not (self.folder / part["file"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{str(self.folder)!r} lacks {', '.join(missing)}; delete that folder to start over"
            )

    def _save_run(self) -> None:
        """Write `run.json`, and `parts.jsonl` anew from `parts` (dropping what a crash left unterminated)."""
        run = json.dumps({"model": self.model, "sources": self.sources})
        _replace_atomically(self.folder / RUN_FILE, lambda path: path.write_text(run))
        lines = "".join(json.dumps(part) + "\n" for part in self.parts)
        _replace_atomically(self.folder / PARTS_FILE, lambda path: path.write_text(lines))

    def add(self, pixel_codes: torch.LongTensor, semantic_codes: torch.LongTensor, skipped: list[str] = ()) -> None:
        """Save the codes of the next images of `sources` as one batch file: `len(pixel_codes)` images in order,
        passing over those named in `skipped` (unreadable, so without codes)."""
        batch = self.sources[self.done : self.done + len(pixel_codes) + len(skipped)]
        names = [name for name in batch if name not in skipped]
        file = f"codes-{len(self.parts):06d}.safetensors"
        _replace_atomically(
            self.folder / file,
            lambda path: save_codes(path, pixel_codes, semantic_codes, names, self.model, self.fingerprint),
        )
        part = {"file": file, "images": len(batch), **({"skipped": list(skipped)} if skipped else {})}
        with open(self.folder / PARTS_FILE, "a") as parts:
            parts.write(json.dumps(part) + "\n")
        self.parts.append(part)

    def finish(self, output: str | os.PathLike) -> tuple[int, ...]:
        """Join the batch files into the code file `output`, remove the progress folder and return the shape of the
        pixel codes. Every image of `sources` must be done."""
        if self.done != len(self.sources):
            raise ValueError(f"only {self.done} of {len(self.sources)} images are tokenized in {str(self.folder)!r}")
        if len(self.skipped) == len(self.sources):
            shutil.rmtree(self.folder)
            raise ValueError(f"none of the {len(self.sources)} images could be read")
        shape = join_code_files([self.folder / part["file"] for part in self.parts], output)
        shutil.rmtree(self.folder)
        return shape


__all__ = ["PARTS_FILE", "RUN_FILE", "PartialCodes", "partial_folder"]
