"""Tests for attnprobe.data: every format, column detection, streaming, bad input and label mapping."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from attnprobe.errors import AttnprobeError
from attnprobe.data.sources import Chunk, LabeledData, TextSource, open_source, read_labeled, sample_source

GLUE = Path("/work/shared/data/glue")
ROWS = [("The cat sat on the mat.", "A cat is sitting.", "entailment"),
        ("It rained all day.", "The sun was out.", "contradiction"),
        ("She plays the violin.", "She is a musician.", "entailment")]


def texts_of(source: TextSource, **kwargs) -> list[str]:
    return [t for chunk in source.chunks(**kwargs) for t in chunk.texts]


def write_frame(path: Path, frame: pd.DataFrame) -> Path:
    fmt = path.suffix
    if fmt == ".csv":
        frame.to_csv(path, index=False)
    elif fmt == ".tsv":
        frame.to_csv(path, index=False, sep="\t", quoting=3)
    elif fmt in (".jsonl", ".ndjson"):
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")), encoding="utf-8")
    else:
        frame.to_parquet(path, index=False)
    return path


# ---- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".pq"])
def test_table_formats_round_trip(tmp_path, ext):
    frame = pd.DataFrame(ROWS, columns=["premise", "hypothesis", "label"])
    path = write_frame(tmp_path / f"data{ext}", frame)
    source = open_source(str(path))
    assert (source.text_column, source.pair_column, source.label_column) == ("premise", "hypothesis", "label")
    assert source.columns == ["premise", "hypothesis", "label"]
    [chunk] = list(source.chunks())
    assert chunk == Chunk([r[0] for r in ROWS], [r[1] for r in ROWS], [r[2] for r in ROWS], [0, 1, 2])
    stats = source.stats()
    assert stats["format"] == {".ndjson": "jsonl", ".pq": "parquet"}.get(ext, ext[1:])
    assert (stats["rows_read"], stats["rows_kept"], stats["rows_skipped"]) == (3, 3, {})


def test_txt_is_one_text_per_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\n  second line  \r\n\nthird line", encoding="utf-8")
    source = open_source(str(path))
    assert (source.format, source.columns, source.text_column) == ("txt", ["text"], "text")
    [chunk] = list(source.chunks())
    assert chunk.texts == ["first line", "second line", "third line"]
    assert chunk.rows == [0, 1, 3]
    assert chunk.pairs is None and chunk.labels is None
    assert source.stats()["rows_skipped"] == {"empty text": 1}


def test_inline_texts():
    source = open_source(texts=["one", " ", "two"])
    assert (source.name, source.format, source.path) == ("<--text>", "inline", None)
    [chunk] = list(source.chunks())
    assert (chunk.texts, chunk.rows) == (["one", "two"], [0, 2])
    assert source.stats()["sha256"] is None


def test_inline_all_blank_is_an_error():
    with pytest.raises(AttnprobeError, match="blank"):
        open_source(texts=["", "  "])


def test_file_and_texts_together_is_an_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x\n")
    with pytest.raises(AttnprobeError, match="not both"):
        open_source(str(path), texts=["y"])


def test_integer_labels_stay_integers_in_jsonl_and_parquet(tmp_path):
    frame = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    for ext in (".jsonl", ".parquet"):
        [chunk] = list(open_source(str(write_frame(tmp_path / f"d{ext}", frame))).chunks())
        assert chunk.labels == [0, 1]


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nhello,1\n".encode())
    assert open_source(str(path)).columns == ["text", "label"]


def test_csv_quoted_fields_with_commas_and_newlines(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('text,label\n"a, b and c",x\n"two\nlines",y\n', encoding="utf-8")
    assert texts_of(open_source(str(path))) == ["a, b and c", "two\nlines"]


def test_tsv_keeps_quotes_as_text(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('sentence\tlabel\n"quoted" start\t1\nit \'s fine "\t0\n', encoding="utf-8")
    assert texts_of(open_source(str(path))) == ['"quoted" start', "it 's fine \""]


# ---- column detection ----------------------------------------------------------------------------


@pytest.mark.parametrize(("columns", "expected"), [
    (["idx", "sentence1", "sentence2", "label"], ("sentence1", "sentence2", "label")),
    (["question", "passage", "answer"], ("question", "passage", None)),
    (["question", "sentence", "label"], ("question", "sentence", "label")),
    (["query", "document", "target"], ("query", "document", "target")),
    (["Text", "Text_B", "Gold_Label"], ("Text", "Text_B", "Gold_Label")),
    (["sentence", "sentence2", "label"], ("sentence", None, "label")),  # sentence2 pairs only sentence1
    (["id", "review", "category"], ("review", None, "category")),
])
def test_column_detection(tmp_path, columns, expected):
    path = tmp_path / "d.csv"
    path.write_text(",".join(columns) + "\n" + ",".join(f"v{i}" for i in range(len(columns))) + "\n")
    source = open_source(str(path))
    assert (source.text_column, source.pair_column, source.label_column) == expected


def test_question_passage_pairs(tmp_path):
    frame = pd.DataFrame({"question": ["Why?", "How?"], "passage": ["Because.", "Like so."]})
    [chunk] = list(open_source(str(write_frame(tmp_path / "qa.jsonl", frame))).chunks())
    assert (chunk.texts, chunk.pairs) == (["Why?", "How?"], ["Because.", "Like so."])


def test_given_columns_are_used(tmp_path):
    frame = pd.DataFrame({"body": ["x", "y"], "other": ["p", "q"], "y": ["1", "0"]})
    path = write_frame(tmp_path / "d.csv", frame)
    source = open_source(str(path), text_column="body", text_pair_column="other", label_column="y")
    [chunk] = list(source.chunks())
    assert (chunk.texts, chunk.pairs, chunk.labels) == (["x", "y"], ["p", "q"], ["1", "0"])


def test_given_column_matches_ignoring_case(tmp_path):
    path = write_frame(tmp_path / "d.csv", pd.DataFrame({"Body": ["x"]}))
    assert open_source(str(path), text_column="body").text_column == "Body"


@pytest.mark.parametrize("option", ["text_column", "text_pair_column", "label_column"])
def test_given_column_missing_lists_columns(tmp_path, option):
    path = write_frame(tmp_path / "d.csv", pd.DataFrame({"text": ["x"], "label": ["1"]}))
    flag = "--" + option.replace("_", "-")
    with pytest.raises(AttnprobeError, match=f"no column 'nope' \\(given with {flag}\\); columns found: text, label"):
        open_source(str(path), **{option: "nope"})


def test_no_text_column_lists_columns_and_suggests_flag(tmp_path):
    path = write_frame(tmp_path / "d.csv", pd.DataFrame({"body": ["x"], "score": [1]}))
    with pytest.raises(AttnprobeError, match="no recognisable text column \\(columns found: body, score\\); pass --text-column"):
        open_source(str(path))


def test_need_labels_without_label_column(tmp_path):
    path = write_frame(tmp_path / "d.csv", pd.DataFrame({"text": ["x"]}))
    with pytest.raises(AttnprobeError, match="no label column .*pass --label-column"):
        open_source(str(path), need_labels=True)


# ---- streaming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".txt", ".csv", ".tsv", ".jsonl", ".parquet"])
def test_chunking_and_limit(tmp_path, ext):
    frame = pd.DataFrame({"text": [f"text number {i}" for i in range(10)]})
    path = tmp_path / f"d{ext}"
    if ext == ".txt":
        path.write_text("\n".join(frame["text"]) + "\n")
    else:
        write_frame(path, frame)
    source = open_source(str(path))
    chunks = list(source.chunks(chunk_rows=3))
    assert [c.rows for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert chunks[3].texts == ["text number 9"]
    limited = list(source.chunks(chunk_rows=3, limit=5))
    assert [c.rows for c in limited] == [[0, 1, 2], [3, 4]]
    assert source.stats()["rows_kept"] == 5


def test_limit_counts_kept_rows(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a\n\nb\n\nc\nd\n")
    source = open_source(str(path))
    assert texts_of(source, limit=3) == ["a", "b", "c"]
    assert (source.stats()["rows_read"], source.stats()["rows_skipped"]) == (5, {"empty text": 2})


def test_chunks_is_a_lazy_generator(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100_000)))
    chunks = open_source(str(path)).chunks(chunk_rows=1000)
    assert inspect.isgenerator(chunks)
    first = next(chunks)
    assert len(first.texts) == 1000 and first.rows[-1] == 999
    chunks.close()


def test_chunks_restarts_and_resets_stats(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a\nb\n")
    source = open_source(str(path))
    assert texts_of(source) == texts_of(source) == ["a", "b"]
    assert source.stats()["rows_read"] == 2


def test_bad_chunk_arguments():
    source = open_source(texts=["a"])
    with pytest.raises(AttnprobeError, match="chunk_rows must be 1 or more"):
        source.chunks(chunk_rows=0)
    with pytest.raises(AttnprobeError, match="limit must be 1 or more"):
        source.chunks(limit=0)


@pytest.mark.parametrize("ext", [".txt", ".csv", ".parquet"])
def test_sha256_is_the_file_hash(tmp_path, ext):
    path = tmp_path / f"d{ext}"
    if ext == ".txt":
        path.write_text("".join(f"line {i}\n" for i in range(50)))
    else:
        write_frame(path, pd.DataFrame({"text": [f"t{i}" for i in range(50)]}))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    source = open_source(str(path))
    list(source.chunks(chunk_rows=7))
    assert source.stats()["sha256"] == expected
    list(source.chunks(limit=2))  # a partial pass still reports the hash of the whole file
    assert source.stats()["sha256"] == expected


# ---- bad input -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(AttnprobeError, match="does not exist"):
        open_source(str(tmp_path / "nope.csv"))


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(AttnprobeError, match="is not a file"):
        open_source(str(tmp_path))


@pytest.mark.parametrize("ext", [".txt", ".csv", ".tsv", ".jsonl", ".parquet"])
def test_empty_file(tmp_path, ext):
    path = tmp_path / f"empty{ext}"
    path.write_bytes(b"")
    with pytest.raises(AttnprobeError, match="is empty"):
        open_source(str(path))


@pytest.mark.parametrize("ext", [".txt", ".csv", ".jsonl"])
def test_only_blank_lines(tmp_path, ext):
    path = tmp_path / f"blank{ext}"
    path.write_text("\n   \n\t\n\n")
    with pytest.raises(AttnprobeError, match="only blank lines"):
        open_source(str(path))


def test_header_without_rows(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("text,label\n")
    with pytest.raises(AttnprobeError, match="header row \\(text, label\\) but no data rows"):
        open_source(str(path))


def test_parquet_without_rows(tmp_path):
    path = write_frame(tmp_path / "e.parquet", pd.DataFrame({"text": pd.Series([], dtype=str)}))
    with pytest.raises(AttnprobeError, match="has no rows"):
        open_source(str(path))


@pytest.mark.parametrize("name", ["data.xlsx", "data", "data.csv.gz"])
def test_unknown_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("text\nx\n")
    with pytest.raises(AttnprobeError, match="unknown extension .*pass a .txt"):
        open_source(str(path))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n{"text": "d"}\n\n{"text": oops}\n')
    with pytest.raises(AttnprobeError, match="bad.jsonl line 7 is not valid JSON"):
        open_source(str(path))


def test_malformed_jsonl_past_the_first_lines_fails_while_reading(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(500)) + "{broken\n")
    source = open_source(str(path))
    with pytest.raises(AttnprobeError, match="line 501 is not valid JSON"):
        list(source.chunks())


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(AttnprobeError, match="list.jsonl line 2 is not valid JSON Lines: a JSON list, not an object"):
        open_source(str(path))


def test_jsonl_missing_key_counts_as_empty_text(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text('{"text": "a"}\n{"other": 1}\n{"text": null}\n{"text": "b"}\n')
    source = open_source(str(path))
    assert texts_of(source) == ["a", "b"]
    assert source.stats()["rows_skipped"] == {"empty text": 2}


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all, just some bytes" * 10)
    with pytest.raises(AttnprobeError, match="bad.parquet is not a readable Parquet file"):
        open_source(str(path))


def test_truncated_parquet(tmp_path):
    good = write_frame(tmp_path / "good.parquet", pd.DataFrame({"text": ["a"] * 100}))
    path = tmp_path / "cut.parquet"
    path.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(AttnprobeError, match="not a readable Parquet file"):
        open_source(str(path))


def test_non_utf8_file_suggests_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,1\nna\u00efve,0\n".encode("latin-1"))
    with pytest.raises(AttnprobeError, match="latin.csv line 2 is not valid utf-8 .*--encoding latin-1"):
        open_source(str(path))
    source = open_source(str(path), encoding="latin-1")
    assert texts_of(source) == ["caf\u00e9", "na\u00efve"]
    assert source.stats()["encoding"] == "latin-1"


def test_non_utf8_late_in_a_txt_file_fails_while_reading(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes(b"fine\n" * 10 + "caf\u00e9\n".encode("latin-1"))
    source = open_source(str(path))
    with pytest.raises(AttnprobeError, match="late.txt line 11 is not valid utf-8.*--encoding"):
        list(source.chunks())


def test_utf16_file_reads_with_its_encoding(tmp_path):
    path = tmp_path / "u16.txt"
    path.write_bytes("caf\u00e9\n\u4e16\u754c\nend\n".encode("utf-16"))
    assert texts_of(open_source(str(path), encoding="utf-16")) == ["caf\u00e9", "\u4e16\u754c", "end"]


def test_unknown_encoding():
    with pytest.raises(AttnprobeError, match="unknown --encoding 'klingon'"):
        open_source(texts=["a"], encoding="klingon")


@pytest.mark.filterwarnings("ignore::pandas.errors.ParserWarning")
def test_trailing_tab_on_every_row_does_not_shift_columns(tmp_path):
    path = tmp_path / "trail.tsv"
    path.write_text("sentence\tlabel\na\t1\t\nb\t0\t\n")
    [chunk] = list(open_source(str(path)).chunks())
    assert (chunk.texts, chunk.labels) == (["a", "b"], ["1", "0"])


def test_malformed_tsv_row(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("sentence\tlabel\na\t1\nb\t0\textra\n")
    source = open_source(str(path))
    with pytest.raises(AttnprobeError, match="bad.tsv is not a well-formed TSV file .*line 3"):
        list(source.chunks())


def test_blank_and_missing_rows_are_skipped_and_counted(tmp_path):
    frame = pd.DataFrame({"sentence1": ["a", "  ", None, "d", "e"], "sentence2": ["p", "q", "r", None, " "],
                          "label": ["x", "y", "z", "w", None]})
    for ext in (".csv", ".parquet", ".jsonl"):
        source = open_source(str(write_frame(tmp_path / f"d{ext}", frame)))
        [chunk] = list(source.chunks())
        assert (chunk.texts, chunk.rows) == (["a"], [0]), ext
        assert source.stats()["rows_skipped"] == {"empty text": 2, "empty pair text": 2}, ext


def test_short_csv_row_counts_as_missing(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("sentence1,sentence2\na,b\nc\n")
    source = open_source(str(path))
    assert texts_of(source) == ["a"]
    assert source.stats()["rows_skipped"] == {"empty pair text": 1}


# ---- read_labeled --------------------------------------------------------------------------------


def test_read_labeled_string_labels_are_sorted(tmp_path):
    frame = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["pos", "neg", "neutral", "pos"]})
    data = read_labeled(str(write_frame(tmp_path / "d.csv", frame)))
    assert isinstance(data, LabeledData)
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.label_ids == [2, 0, 1, 2]
    assert data.pairs is None
    assert data.stats["label_counts"] == {"neg": 1, "neutral": 1, "pos": 2}


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_read_labeled_integer_labels_keep_their_value(tmp_path, ext):
    frame = pd.DataFrame({"sentence": ["a", "b", "c"], "label": [2, 0, 2]})
    data = read_labeled(str(write_frame(tmp_path / f"d{ext}", frame)))
    assert data.label_ids == [2, 0, 2]
    assert data.label_names == ["0", "1", "2"]


def test_read_labeled_pairs_and_missing_labels(tmp_path):
    frame = pd.DataFrame({"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"],
                          "label": ["yes", None, "no"]})
    data = read_labeled(str(write_frame(tmp_path / "d.parquet", frame)))
    assert (data.texts, data.pairs, data.label_ids) == (["a", "c"], ["x", "z"], [1, 0])
    assert data.stats["rows_skipped"] == {"missing label": 1}


def test_read_labeled_limit(tmp_path):
    frame = pd.DataFrame({"text": list("abcdef"), "label": [0, 1] * 3})
    assert read_labeled(str(write_frame(tmp_path / "d.jsonl", frame)), limit=4).texts == list("abcd")


def test_read_labeled_eval_uses_training_names(tmp_path):
    train = read_labeled(str(write_frame(tmp_path / "train.csv", pd.DataFrame(
        {"text": list("abc"), "label": ["neg", "pos", "zzz"]}))))
    dev = read_labeled(str(write_frame(tmp_path / "dev.csv", pd.DataFrame(
        {"text": list("ab"), "label": ["zzz", "zzz"]}))), label_names=train.label_names, min_classes=1)
    assert (dev.label_ids, dev.label_names) == ([2, 2], ["neg", "pos", "zzz"])


def test_read_labeled_unseen_eval_labels(tmp_path):
    path = write_frame(tmp_path / "dev.csv", pd.DataFrame({"text": list("abc"), "label": ["neg", "maybe", "huh"]}))
    with pytest.raises(AttnprobeError, match="eval file .*dev.csv has labels the training file never had: huh, maybe"):
        read_labeled(str(path), label_names=["neg", "pos"])


def test_read_labeled_single_class(tmp_path):
    path = write_frame(tmp_path / "one.csv", pd.DataFrame({"text": list("abc"), "label": ["pos"] * 3}))
    with pytest.raises(AttnprobeError, match="labels in .*one.csv are all one class \\(pos\\)"):
        read_labeled(str(path))


def test_read_labeled_float_labels_are_refused(tmp_path):
    path = write_frame(tmp_path / "f.parquet", pd.DataFrame({"text": list("ab"), "label": [0.5, 1.5]}))
    with pytest.raises(AttnprobeError, match="not a class name or an integer"):
        read_labeled(str(path))


def test_read_labeled_needs_a_label_column(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a\nb\n")
    with pytest.raises(AttnprobeError, match="no label column"):
        read_labeled(str(path))


# ---- sample corpus -------------------------------------------------------------------------------


def test_sample_corpus():
    source = sample_source()
    assert (source.name, source.format, source.path) == ("<sample>", "sample", None)
    assert (source.text_column, source.pair_column) == ("sentence1", "sentence2")
    chunks = list(source.chunks(chunk_rows=64))
    texts = [t for c in chunks for t in c.texts]
    pairs = [p for c in chunks for p in c.pairs]
    assert len(texts) >= 250 and len(texts) == len(pairs)
    assert 50 <= sum(p is not None for p in pairs) <= 120
    assert len(set(texts)) > 0.95 * len(texts)
    words = [len(t.split()) for t, p in zip(texts, pairs) if p is None]
    assert min(words) >= 5 and max(words) <= 60
    stats = source.stats()
    assert stats["rows_skipped"] == {} and stats["sha256"] is None
    assert open_source().columns == source.columns


def test_importing_data_stays_light():
    code = ("import sys, attnprobe.data.sources, attnprobe.data.readers; "
            "print([m for m in ('pandas', 'pyarrow', 'torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- real GLUE files (optional) ------------------------------------------------------------------


@pytest.mark.skipif(not (GLUE / "RTE" / "dev.tsv").is_file(), reason="GLUE data not present")
def test_glue_rte_dev():
    data = read_labeled(str(GLUE / "RTE" / "dev.tsv"))
    assert data.label_names == ["entailment", "not_entailment"]
    assert data.pairs is not None and len(data.pairs) == len(data.texts) > 200


@pytest.mark.skipif(not (GLUE / "SST-2" / "dev.tsv").is_file(), reason="GLUE data not present")
def test_glue_sst2_dev():
    source = open_source(str(GLUE / "SST-2" / "dev.tsv"))
    assert (source.text_column, source.pair_column, source.label_column) == ("sentence", None, "label")
    assert read_labeled(str(GLUE / "SST-2" / "dev.tsv")).label_names == ["0", "1"]


def test_inline_single_string_is_one_text():
    assert texts_of(open_source(texts="just one text")) == ["just one text"]


def test_read_labeled_huge_integer_label_is_refused(tmp_path):
    path = write_frame(tmp_path / "d.csv", pd.DataFrame({"text": list("ab"), "label": [0, 999_999]}))
    with pytest.raises(AttnprobeError, match="go up to 999999 but only 2 values occur"):
        read_labeled(str(path))


def test_read_labeled_negative_integer_labels_are_names(tmp_path):
    path = write_frame(tmp_path / "d.csv", pd.DataFrame({"text": list("abc"), "label": [1, -1, 1]}))
    data = read_labeled(str(path))
    assert (data.label_names, data.label_ids) == (["-1", "1"], [1, 0, 1])


def test_stopping_early_closes_the_file(tmp_path, monkeypatch):
    from attnprobe.data import sources

    opened = []

    def tracking_open(*args, **kwargs):
        opened.append(open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sources, "open", tracking_open, raising=False)
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    source = open_source(str(path))
    chunks = source.chunks(chunk_rows=10)
    next(chunks)
    assert not opened[-1].closed
    chunks.close()
    assert texts_of(source, limit=3) == ["line 0", "line 1", "line 2"]
    assert opened and all(fh.closed for fh in opened)
