"""examples/pretokenize.py on a tiny random tokenizer: the codes are those of a direct `encode` (from image files or
webdataset tar shards), unreadable images are skipped and counted, every other source column is copied with its
type, and an interrupted run resumes without redoing its finished chunks."""

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.hub import save_tokenizer_folder
from dualtoken_hf.hub.locking import LOCK_FILE

from conftest import launch_on_two_cpu_processes, load_example


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretokenize.py"


pretokenize = load_example(SCRIPT)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).eval()
    return Path(save_tokenizer_folder(model, tmp_path_factory.mktemp("tokenizer")))


def write_images(folder: Path, count: int, broken: tuple[int, ...] = ()) -> list[str]:
    """PNG files of different sizes (and a corrupt file at the `broken` positions), with a captions.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    with open(folder / "captions.jsonl", "w") as captions:
        for index in range(count):
            name = f"image_{index}.png"
            if index in broken:
                (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
            else:
                array = (rng.random((40 + 8 * index, 64, 3)) * 255).astype(np.uint8)
                PIL.Image.fromarray(array).save(folder / name)
            captions.write(json.dumps({"image": name, "text": f"caption {index}"}) + "\n")
            names.append(name)
    return names


def direct_codes(tokenizer_dir: Path, paths: list[Path]) -> dict[str, torch.Tensor]:
    model = DualTokenVisionModel.from_pretrained(tokenizer_dir).eval()
    processor = DualTokenImageProcessor.from_pretrained(tokenizer_dir)
    codes = {"pixel": [], "semantic": []}
    with torch.inference_mode():
        for path in paths:
            output = model.encode(processor(PIL.Image.open(path), return_tensors="pt")["pixel_values"])
            codes["pixel"].append(output.pixel_codes[0])
            codes["semantic"].append(output.semantic_codes[0])
    return {branch: torch.stack(values) for branch, values in codes.items()}


def read_output(output_dir: Path) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_dir=str(output_dir / "data"), split="train",
                                 cache_dir=str(output_dir.parent / "cache"))


def script_args(data_dir: Path, output_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return [
        "--tokenizer_model_name_or_path", str(tokenizer_dir), "--data_files", str(data_dir / "captions.jsonl"),
        "--output_dir", str(output_dir), "--cache_dir", str(output_dir.parent / "cache"), "--batch_size", "2",
        "--chunk_size", "3", *extra,
    ]


def run(data_dir: Path, output_dir: Path, tokenizer_dir: Path, *extra: str) -> dict:
    return pretokenize.main(pretokenize.parse_args(script_args(data_dir, output_dir, tokenizer_dir, *extra)))


def test_codes_equal_a_direct_encode_and_unreadable_images_are_skipped_and_counted(tmp_path, tokenizer_dir):
    data_dir = tmp_path / "images"
    names = write_images(data_dir, 6, broken=(4,))
    summary = run(data_dir, tmp_path / "codes", tokenizer_dir)

    assert summary["rows"] == 5 and summary["skipped_images"] == 1 and summary["chunks"] == 2
    assert json.loads((tmp_path / "codes" / "pretokenize.json").read_text()) == summary
    assert not (tmp_path / "codes" / LOCK_FILE).exists()
    written = read_output(tmp_path / "codes")
    readable = [index for index in range(6) if index != 4]
    assert written["text"] == [f"caption {index}" for index in readable]
    expected = direct_codes(tokenizer_dir, [data_dir / names[index] for index in readable])
    for branch in ("pixel", "semantic"):
        shapes = torch.tensor(written[f"{branch}_shape"])
        assert (shapes == torch.tensor(expected[branch].shape[1:])).all()
        codes = torch.tensor(written[f"{branch}_codes"]).view(-1, *expected[branch].shape[1:])
        torch.testing.assert_close(codes, expected[branch], rtol=0, atol=0)


def test_an_interrupted_run_resumes_without_redoing_finished_chunks(tmp_path, tokenizer_dir, monkeypatch):
    data_dir = tmp_path / "images"
    write_images(data_dir, 7, broken=(1,))
    output_dir = tmp_path / "codes"
    write_chunk = pretokenize.write_chunk
    written_chunks = []

    def write_then_fail(columns, features, path):
        write_chunk(columns, features, path)
        written_chunks.append(path.name)
        raise KeyboardInterrupt("stopped after one chunk")

    monkeypatch.setattr(pretokenize, "write_chunk", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, output_dir, tokenizer_dir)
    assert written_chunks == ["train-00000-of-00001-00000.parquet"]
    first_chunk = output_dir / "data" / written_chunks[0]
    finished_at = first_chunk.stat().st_mtime_ns

    def record(columns, features, path):
        written_chunks.append(path.name)
        write_chunk(columns, features, path)

    monkeypatch.setattr(pretokenize, "write_chunk", record)
    summary = run(data_dir, output_dir, tokenizer_dir)
    assert written_chunks[1:] == ["train-00000-of-00001-00001.parquet", "train-00000-of-00001-00002.parquet"]
    assert first_chunk.stat().st_mtime_ns == finished_at
    # The unreadable image was in the chunk of the first run: its count survives the interruption.
    assert summary == {"rows": 6, "skipped_images": 1, "chunks": 3, "data_dir": str(output_dir / "data")}
    assert read_output(output_dir)["text"] == [f"caption {index}" for index in range(7) if index != 1]


def test_a_rerun_with_other_settings_is_refused(tmp_path, tokenizer_dir):
    data_dir = tmp_path / "images"
    write_images(data_dir, 2)
    run(data_dir, tmp_path / "codes", tokenizer_dir)
    with pytest.raises(ValueError, match="chunk_size: 3 then, 5 now"):
        run(data_dir, tmp_path / "codes", tokenizer_dir, "--chunk_size", "5")


@pytest.mark.slow
def test_two_processes_write_one_shard_each_and_together_the_single_process_output(tmp_path, tokenizer_dir):
    data_dir = tmp_path / "images"
    write_images(data_dir, 5, broken=(3,))
    run(data_dir, tmp_path / "single", tokenizer_dir)
    launch_on_two_cpu_processes(SCRIPT, script_args(data_dir, tmp_path / "two", tokenizer_dir), timeout=180)

    files = sorted(path.name for path in (tmp_path / "two" / "data").iterdir())
    assert files == ["train-00000-of-00002-00000.parquet", "train-00001-of-00002-00000.parquet"]
    summary = json.loads((tmp_path / "two" / "pretokenize.json").read_text())
    assert summary["rows"] == 4 and summary["skipped_images"] == 1
    assert read_output(tmp_path / "two").to_dict() == read_output(tmp_path / "single").to_dict()


def write_shards(image_dir: Path, names: list[str], shard_dir: Path, per_shard: int) -> list[Path]:
    """Webdataset tar shards `shard-000.tar`, ... of the images in `names`, `per_shard` samples each: sample `i` is
    `<i>.png` with its caption in `<i>.txt`."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(names), per_shard):
        shards.append(shard_dir / f"shard-{start // per_shard:03d}.tar")
        with tarfile.open(shards[-1], "w") as shard:
            for index in range(start, min(start + per_shard, len(names))):
                shard.add(image_dir / names[index], arcname=f"{index:03d}.png")
                caption = f"caption {index}".encode()
                member = tarfile.TarInfo(f"{index:03d}.txt")
                member.size = len(caption)
                shard.addfile(member, io.BytesIO(caption))
    return shards


def test_webdataset_shards_are_encoded_with_their_captions_and_unreadable_images_are_skipped(tmp_path, tokenizer_dir):
    image_dir = tmp_path / "images"
    names = write_images(image_dir, 5, broken=(1,))
    write_shards(image_dir, names, tmp_path / "shards", per_shard=3)
    summary = pretokenize.main(pretokenize.parse_args([
        "--tokenizer_model_name_or_path", str(tokenizer_dir), "--train_shards",
        str(tmp_path / "shards" / "shard-{000..001}.tar"), "--output_dir", str(tmp_path / "codes"),
        "--cache_dir", str(tmp_path / "cache"), "--batch_size", "2", "--chunk_size", "3",
    ]))

    assert summary["rows"] == 4 and summary["skipped_images"] == 1
    written = read_output(tmp_path / "codes")
    readable = [0, 2, 3, 4]
    assert written["txt"] == [f"caption {index}" for index in readable]
    assert written["__key__"] == [f"{index:03d}" for index in readable]
    assert "png" not in written.column_names
    expected = direct_codes(tokenizer_dir, [image_dir / names[index] for index in readable])
    for branch in ("pixel", "semantic"):
        codes = torch.tensor(written[f"{branch}_codes"]).view(-1, *expected[branch].shape[1:])
        torch.testing.assert_close(codes, expected[branch], rtol=0, atol=0)


def test_every_column_but_the_image_is_copied_with_its_type_and_a_changed_source_is_refused(tmp_path, tokenizer_dir):
    data_dir = tmp_path / "images"
    names = write_images(data_dir, 3, broken=(1,))
    rows = [{"image": name, "label": index * 7,
             "conversations": [{"from": "human", "value": f"<image>\nWhat is {index}?"},
                               {"from": "gpt", "value": f"It is {index}."}]}
            for index, name in enumerate(names)]
    chat_file = data_dir / "chat.jsonl"
    chat_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["--tokenizer_model_name_or_path", str(tokenizer_dir), "--data_files", str(chat_file),
            "--output_dir", str(tmp_path / "codes"), "--cache_dir", str(tmp_path / "cache")]
    pretokenize.main(pretokenize.parse_args(args))

    written = read_output(tmp_path / "codes")
    source = datasets.load_dataset("json", data_files=str(chat_file), split="train", cache_dir=str(tmp_path / "cache"))
    assert {name: written.features[name] for name in ("label", "conversations")} == {
        "label": source.features["label"], "conversations": source.features["conversations"]}
    assert written.features["label"] == datasets.Value("int64") and "image" not in written.column_names
    assert written.select_columns(["label", "conversations"]).to_list() == [
        {"label": row["label"], "conversations": row["conversations"]} for row in (rows[0], rows[2])]

    # Same file, same rows, but the label became a string: the copied columns differ, so resuming is refused.
    chat_file.write_text("".join(json.dumps({**row, "label": str(row["label"])}) + "\n" for row in rows))
    with pytest.raises(ValueError, match="columns: .*int64.* then, .*string.* now"):
        pretokenize.main(pretokenize.parse_args(args))
