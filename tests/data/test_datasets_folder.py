"""A folder written by ``datasets``' ``save_to_disk`` as data: Arrow IPC stream files read with pyarrow alone.

The folders are written here with pyarrow in the layout save_to_disk uses (``data-XXXXX-of-NNNNN.arrow``
stream files, ``dataset_info.json``, ``state.json`` listing the files); where ``datasets`` is importable the
same rows are also written by ``Dataset.save_to_disk`` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from attnprobe.data import sources
from attnprobe.errors import AttnprobeError

ROWS = [{"id": str(i), "sentence": f"text number {i}", "label": i % 2,
         "answers": {"text": [f"number {i}"], "answer_start": [5]}, "endings": [f"e{i}a", f"e{i}b"]}
        for i in range(7)]


def write_dataset_folder(folder: Path, rows: list[dict], files: int = 2) -> Path:
    """``rows`` in ``files`` Arrow stream files, as ``Dataset.save_to_disk`` lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    step = -(-len(rows) // files)
    names = []
    for k in range(files):
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(k * step, step), max_chunksize=2)  # several record batches per file
        names.append(name)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_split": "train"}))
    return folder


def test_text_source_reads_every_row_in_order(tmp_path):
    folder = write_dataset_folder(tmp_path / "ds", ROWS, files=3)
    src = sources.open_source(str(folder))
    assert src.format == "arrow" and src.text_column == "sentence" and src.label_column == "label"
    texts = [t for chunk in src.chunks(chunk_rows=3) for t in chunk.texts]
    assert texts == [r["sentence"] for r in ROWS]
    assert src.stats()["rows_read"] == 7 and len(src.stats()["sha256"]) == 64
    labeled = sources.read_labeled(str(folder))
    assert labeled.label_ids == [r["label"] for r in ROWS] and labeled.label_names == ["0", "1"]


def test_state_json_sets_the_file_order(tmp_path):
    folder = write_dataset_folder(tmp_path / "ds", ROWS, files=2)
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"].reverse()
    (folder / "state.json").write_text(json.dumps(state))
    _, rows, _ = sources.read_rows(str(folder))
    assert [r["id"] for r in rows] == ["4", "5", "6", "0", "1", "2", "3"]


def test_read_rows_keeps_nested_values(tmp_path):
    folder = write_dataset_folder(tmp_path / "ds", ROWS)
    columns, rows, stats = sources.read_rows(str(folder))
    assert columns == list(ROWS[0]) and stats["format"] == "arrow"
    assert rows == ROWS


def test_bad_folders_fail_with_one_line(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    with pytest.raises(AttnprobeError, match="is not a file, nor a folder written by datasets' save_to_disk") as err:
        sources.open_source(str(tmp_path / "plain"))
    assert "\n" not in str(err.value)
    splits = tmp_path / "dict"
    write_dataset_folder(splits / "train", ROWS)
    write_dataset_folder(splits / "validation", ROWS)
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    with pytest.raises(AttnprobeError, match="several splits \\(train, validation\\); pass one of them"):
        sources.open_source(str(splits))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "state.json").write_text(json.dumps({"_data_files": []}))
    with pytest.raises(AttnprobeError, match="holds no data-\\*.arrow files"):
        sources.open_source(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text("{}")
    (broken / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(AttnprobeError, match="is not a readable Arrow stream"):
        sources.open_source(str(broken))


def test_scan_reads_a_dataset_folder(tmp_path, tiny_bert):
    from typer.testing import CliRunner

    from attnprobe.cli import app
    from attnprobe.runtime import outputs

    folder = write_dataset_folder(tmp_path / "ds", ROWS)
    out = tmp_path / "scan"
    res = CliRunner().invoke(app, ["scan", str(tiny_bert), "--data", str(folder), "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = outputs.read_run_json(out)["data"]
    assert data["format"] == "arrow" and data["rows_kept"] == len(ROWS)


def test_save_to_disk_folder_when_datasets_is_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    _, rows, _ = sources.read_rows(str(folder))
    assert rows == ROWS
    assert [t for c in sources.open_source(str(folder)).chunks() for t in c.texts] == [r["sentence"] for r in ROWS]
