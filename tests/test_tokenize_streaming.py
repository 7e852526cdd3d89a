"""`dualtoken tokenize` over many images: a batch at a time in memory, codes saved as they come, and an interrupted
run resumed without tokenizing its finished images again."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionModel
from dualtoken_hf.cli import main
from dualtoken_hf.cli.files import join_code_files, load_codes, save_codes
from dualtoken_hf.cli.partial_codes import PARTS_FILE, RUN_FILE, partial_folder


IMAGES = 10
BATCH = 3


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Ten random images in two levels of folders, plus files `tokenize` must leave out."""
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    for index in range(IMAGES):
        path = folder / ("nested" if index % 3 == 0 else ".") / f"image-{index:02d}.png"
        path.parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"a hidden file, e.g. macOS metadata")
    return folder


def expected_sources(folder) -> list[str]:
    return sorted(str(path) for path in folder.rglob("image-*.png"))


def tokenize(tokenizer_folder, image_folder, output, *extra) -> int:
    argv = ["tokenize", "--model", str(tokenizer_folder), str(image_folder), "--output", str(output)]
    return main(argv + ["--batch-size", str(BATCH), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_folder, image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted") / "codes.safetensors"
    assert tokenize(tokenizer_folder, image_folder, output) == 0
    return load_codes(output)


@pytest.fixture
def counted_batches(monkeypatch):
    """The batch sizes `encode` sees, in order; `interrupt_after` raises KeyboardInterrupt (Ctrl-C) in the batch
    after that many."""
    batches = []
    encode = DualTokenVisionModel.encode
    state = {"interrupt_after": None}

    def counting_encode(self, pixel_values, *args, **kwargs):
        if state["interrupt_after"] is not None and len(batches) == state["interrupt_after"]:
            raise KeyboardInterrupt
        batches.append(pixel_values.shape[0])
        return encode(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(DualTokenVisionModel, "encode", counting_encode)
    return batches, state


def test_a_folder_stands_for_its_image_files_and_gives_the_codes_of_one_batch(tokenizer_folder, image_folder,
                                                                               uninterrupted):
    codes, metadata = uninterrupted
    sources = expected_sources(image_folder)
    assert json.loads(metadata["sources"]) == sources
    assert metadata["model"] == str(tokenizer_folder) and metadata["format"] == "dualtoken-codes"
    model = DualTokenVisionModel.from_pretrained(tokenizer_folder).eval()
    pixel_values = DualTokenImageProcessor.from_pretrained(tokenizer_folder)(sources, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model.encode(pixel_values)
    assert torch.equal(codes["pixel_codes"], expected.pixel_codes)
    assert torch.equal(codes["semantic_codes"], expected.semantic_codes)


def test_images_are_read_a_batch_at_a_time(tokenizer_folder, image_folder, tmp_path, monkeypatch):
    opened_before_batch = []
    opened = []
    image_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *args, **kw: opened.append(args[0]) or image_open(*args, **kw))
    encode = DualTokenVisionModel.encode

    def recording_encode(self, pixel_values, *args, **kwargs):
        opened_before_batch.append(len(opened))
        return encode(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(DualTokenVisionModel, "encode", recording_encode)
    argv = ["tokenize", "--model", str(tokenizer_folder), *expected_sources(image_folder)]
    assert main(argv + ["--output", str(tmp_path / "codes.safetensors"), "--batch-size", str(BATCH)]) == 0
    # Before the k-th batch is encoded, only the images of batches 0..k have been opened.
    assert opened_before_batch == [min(BATCH * (k + 1), IMAGES) for k in range(-(-IMAGES // BATCH))]
    assert not partial_folder(tmp_path / "codes.safetensors").exists()


def test_an_interrupted_run_resumes_without_redoing_finished_images(tokenizer_folder, image_folder, uninterrupted,
                                                                    tmp_path, capsys, counted_batches):
    batches, state = counted_batches
    output = tmp_path / "codes.safetensors"
    state["interrupt_after"] = 2
    assert tokenize(tokenizer_folder, image_folder, output) == 130
    assert batches == [BATCH, BATCH] and not output.exists()
    err = capsys.readouterr().err
    assert f"the codes of {2 * BATCH} of {IMAGES} images are saved" in err and "--resume" in err
    parts_file = partial_folder(output) / PARTS_FILE
    assert [json.loads(line)["images"] for line in parts_file.read_text().splitlines()] == [BATCH, BATCH]
    # A crash while appending the record of a third batch leaves an unterminated line: that batch does not count.
    with open(parts_file, "a") as parts:
        parts.write('{"file": "codes-000002.safetensors", "ima')

    # Without --resume the unfinished run is neither overwritten nor continued.
    state["interrupt_after"] = None
    assert tokenize(tokenizer_folder, image_folder, output) == 2
    assert "holds an unfinished run (6 of 10 images tokenized): pass --resume" in capsys.readouterr().err
    assert batches == [BATCH, BATCH]

    assert tokenize(tokenizer_folder, image_folder, output, "--resume") == 0
    assert batches == [BATCH, BATCH, BATCH, IMAGES - 3 * BATCH]  # only the 4 images left
    assert "resuming: 6 of 10 images already tokenized" in capsys.readouterr().out
    codes, metadata = load_codes(output)
    expected_codes, expected_metadata = uninterrupted
    assert metadata == expected_metadata
    for name in ("pixel_codes", "semantic_codes"):
        assert torch.equal(codes[name], expected_codes[name])
    assert not partial_folder(output).exists()


@pytest.mark.parametrize("change", ["model", "images"])
def test_resume_refuses_another_model_or_other_images(change, tokenizer_folder, image_folder, tmp_path, capsys,
                                                      counted_batches):
    _, state = counted_batches
    output = tmp_path / "codes.safetensors"
    state["interrupt_after"] = 1
    assert tokenize(tokenizer_folder, image_folder, output) == 130
    state["interrupt_after"] = None
    if change == "model":
        other = tmp_path / "other-tokenizer"
        other.symlink_to(tokenizer_folder)
        status, phrase = tokenize(other, image_folder, output, "--resume"), "used the model"
    else:
        images = expected_sources(image_folder)[1:]
        argv = ["tokenize", "--model", str(tokenizer_folder), *images, "--output", str(output), "--resume"]
        status, phrase = main(argv), "tokenized other images: its image 0 is"
    assert status == 2
    assert phrase in capsys.readouterr().err
    assert (partial_folder(output) / RUN_FILE).is_file()


def test_a_run_that_saved_no_batch_starts_over(tokenizer_folder, image_folder, uninterrupted, tmp_path,
                                               counted_batches):
    _, state = counted_batches
    output = tmp_path / "codes.safetensors"
    state["interrupt_after"] = 0
    assert tokenize(tokenizer_folder, image_folder, output) == 130
    state["interrupt_after"] = None
    assert tokenize(tokenizer_folder, image_folder, output) == 0
    assert torch.equal(load_codes(output)[0]["pixel_codes"], uninterrupted[0]["pixel_codes"])


def test_an_empty_folder_and_a_missing_path_are_clear_errors(tokenizer_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert tokenize(tokenizer_folder, tmp_path / "empty", tmp_path / "codes.safetensors") == 2
    assert "holds no image files" in capsys.readouterr().err
    assert tokenize(tokenizer_folder, tmp_path / "missing", tmp_path / "codes.safetensors") == 2
    assert "no such image file or folder" in capsys.readouterr().err


def random_codes(batch: int, generator: torch.Generator, grid=(2, 2), depth=3):
    return [torch.randint(0, 16, (batch, *grid, depth), generator=generator) for _ in range(2)]


def test_join_code_files_concatenates_codes_and_sources(tmp_path):
    generator = torch.Generator().manual_seed(0)
    parts, all_codes, all_sources = [], [], []
    for index, batch in enumerate([3, 1, 2]):
        codes = random_codes(batch, generator)
        sources = [f"part{index}-image{i}.png" for i in range(batch)]
        save_codes(tmp_path / f"part{index}.safetensors", *codes, sources, "tokenizer-dir")
        parts.append(tmp_path / f"part{index}.safetensors")
        all_codes.append(codes)
        all_sources += sources
    assert join_code_files(parts, tmp_path / "joined.safetensors") == (6, 2, 2, 3)
    codes, metadata = load_codes(tmp_path / "joined.safetensors")
    assert torch.equal(codes["pixel_codes"], torch.cat([pixel for pixel, _ in all_codes]))
    assert torch.equal(codes["semantic_codes"], torch.cat([semantic for _, semantic in all_codes]))
    assert json.loads(metadata["sources"]) == all_sources and metadata["model"] == "tokenizer-dir"
    assert not (tmp_path / "joined.safetensors.joining").exists()


def test_join_code_files_refuses_parts_of_another_grid_or_model(tmp_path):
    generator = torch.Generator().manual_seed(0)
    save_codes(tmp_path / "a.safetensors", *random_codes(1, generator), ["a.png"], "tokenizer-dir")
    save_codes(tmp_path / "b.safetensors", *random_codes(1, generator, grid=(3, 3)), ["b.png"], "tokenizer-dir")
    save_codes(tmp_path / "c.safetensors", *random_codes(1, generator), ["c.png"], "another-dir")
    with pytest.raises(ValueError, match="different grids or depths"):
        join_code_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "joined.safetensors")
    with pytest.raises(ValueError, match="other metadata"):
        join_code_files([tmp_path / "a.safetensors", tmp_path / "c.safetensors"], tmp_path / "joined.safetensors")
    assert not (tmp_path / "joined.safetensors").exists()
