"""Where texts come from: a data file, --text or the sample corpus, with its columns found, its rows streamed
in chunks and, for refine, its labels mapped to ids.

Every check that needs no full read happens in ``open_source``, so a bad file fails before any model is
loaded. Decoding each file format is readers.py's job; tokenizing, batching and truncating are scan.py's and
refine.py's. Only the standard library is imported here: pandas and pyarrow load when a file needs them,
torch and transformers never.
"""

from __future__ import annotations

import codecs
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from attnprobe.errors import AttnprobeError
from attnprobe.data.readers import FormatReader, list_names

FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}
TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "premise", "query", "content", "document",
                "review", "tweet", "utterance")
PAIR_COLUMNS = {"sentence1": ("sentence2",), "question": ("passage", "sentence", "context"),
                "premise": ("hypothesis",), "text": ("text_pair", "text_b", "text2"),
                "query": ("passage", "document")}
LABEL_COLUMNS = ("label", "labels", "gold_label", "target", "class", "category")
SAMPLE_CORPUS = "sample_corpus.tsv"
_INTEGER = re.compile(r"[+-]?\d+")
_KNOWN_FORMATS = (".txt (one text per line), .csv, .tsv, .jsonl/.ndjson or .parquet/.pq, or a folder written by "
                  "datasets' save_to_disk")


@dataclass
class Chunk:
    """Up to ``chunk_rows`` kept rows of a source.

    ``pairs`` is None when the source has no pair column; otherwise one entry per row, and an entry is
    None only for rows of the sample corpus that are single sentences (files skip rows whose second text
    is missing). ``labels`` is None when there is no label column; entries are the raw values (str or int),
    None where a row has no label, unless the source was opened with ``need_labels``.
    """

    texts: list[str]
    pairs: list[str | None] | None
    labels: list | None
    rows: list[int]  # 0-based data-row index in the source of each row


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


def _clean_text(value: Any) -> str | None:
    """The value as a stripped str, or None when it is missing (None, NaN, NA) or blank."""
    if _is_missing(value):
        return None
    text = (value if isinstance(value, str) else str(value)).strip()
    return text or None


def _clean_label(value: Any) -> Any:
    if isinstance(value, str) or _is_missing(value):
        return _clean_text(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(value) if isinstance(value, bool) else value


def _find_column(columns: Sequence[str], wanted: str) -> str | None:
    """``wanted`` itself, else the first column equal to it ignoring case and surrounding spaces."""
    if wanted in columns:
        return wanted
    return next((c for c in columns if c.strip().lower() == wanted.strip().lower()), None)


def _resolve_columns(name: str, columns: list[str], text: str | None, pair: str | None,
                     label: str | None, need_labels: bool) -> tuple[str, str | None, str | None]:
    """The text, pair and label columns: the given ones (which must exist) or the ones found by name."""
    found = {}
    for flag, given in (("--text-column", text), ("--text-pair-column", pair), ("--label-column", label)):
        if given is not None:
            found[flag] = _find_column(columns, given)
            if found[flag] is None:
                raise AttnprobeError(f"{name} has no column {given!r} (given with {flag}); "
                                     f"columns found: {list_names(columns)}")
    text = found.get("--text-column")
    if text is None:
        present = [c for c in (_find_column(columns, w) for w in TEXT_COLUMNS) if c]
        if not present:
            raise AttnprobeError(f"{name} has no recognisable text column "
                                 f"(columns found: {list_names(columns)}); pass --text-column NAME")
        # QNLI-style files have question + sentence: "sentence" is the second text there, not the first.
        text = next((lead for lead in present if present[0].strip().lower() in PAIR_COLUMNS.get(
            lead.strip().lower(), ())), present[0])
    pair = found.get("--text-pair-column") or next(
        (c for c in (_find_column(columns, w) for w in PAIR_COLUMNS.get(text.strip().lower(), ()))
         if c and c != text), None)
    label = found.get("--label-column") or next(
        (c for c in (_find_column(columns, w) for w in LABEL_COLUMNS) if c and c not in (text, pair)), None)
    if need_labels and label is None:
        raise AttnprobeError(f"{name} has no label column (columns found: {list_names(columns)}); "
                             "pass --label-column NAME")
    return text, pair, label


class TextSource:
    """A checked source of texts; ``chunks()`` streams it and ``stats()`` reports on the last pass.

    Built by ``open_source`` / ``sample_source``; the constructor arguments after ``encoding`` are internal.
    """

    def __init__(self, name: str, path: str | None, format: str, columns: list[str], text_column: str,
                 pair_column: str | None, label_column: str | None, encoding: str | None, *,
                 reader: FormatReader | None = None, texts: Sequence[str] | None = None,
                 pairs_optional: bool = False, need_labels: bool = False):
        self.name, self.path, self.format, self.columns = name, path, format, columns
        self.text_column, self.pair_column, self.label_column = text_column, pair_column, label_column
        self.encoding = encoding
        self._reader, self._texts = reader, texts
        self._pairs_optional, self._need_labels = pairs_optional, need_labels
        self._read, self._kept, self._skipped = 0, 0, Counter()

    def __repr__(self) -> str:
        return (f"TextSource({self.name!r}, format={self.format!r}, text_column={self.text_column!r}, "
                f"pair_column={self.pair_column!r}, label_column={self.label_column!r})")

    def chunks(self, chunk_rows: int = 2048, limit: int | None = None) -> Iterator[Chunk]:
        """Stream the kept rows in chunks of ``chunk_rows`` (the last may be shorter), stopping after
        ``limit`` kept rows. Memory holds about one chunk; each call starts again from the beginning."""
        if chunk_rows < 1:
            raise AttnprobeError(f"chunk_rows must be 1 or more (got {chunk_rows})")
        if limit is not None and limit < 1:
            raise AttnprobeError(f"limit must be 1 or more (got {limit})")
        return self._chunks(chunk_rows, limit)

    def _chunks(self, chunk_rows: int, limit: int | None) -> Iterator[Chunk]:
        self._read, self._kept, self._skipped = 0, 0, Counter()
        cols = [c for c in (self.text_column, self.pair_column, self.label_column) if c is not None]
        chunk = self._empty_chunk()
        batches = self._batches(cols, chunk_rows)
        try:
            yield from self._fill(batches, chunk, chunk_rows, limit)
        finally:
            batches.close()  # closes the file now, also when the caller stops early

    def _fill(self, batches: Iterator[dict[str, list]], chunk: Chunk, chunk_rows: int,
              limit: int | None) -> Iterator[Chunk]:
        for batch in batches:
            for i, raw_text in enumerate(batch[self.text_column]):
                row, self._read = self._read, self._read + 1
                text = _clean_text(raw_text)
                pair = _clean_text(batch[self.pair_column][i]) if self.pair_column else None
                label = _clean_label(batch[self.label_column][i]) if self.label_column else None
                pair_missing = self.pair_column is not None and pair is None and not self._pairs_optional
                reason = ("empty text" if text is None
                          else "empty pair text" if pair_missing
                          else "missing label" if self._need_labels and label is None
                          else None)
                if reason:
                    self._skipped[reason] += 1
                    continue
                chunk.texts.append(text)
                chunk.rows.append(row)
                if chunk.pairs is not None:
                    chunk.pairs.append(pair)
                if chunk.labels is not None:
                    chunk.labels.append(label)
                self._kept += 1
                if len(chunk.texts) == chunk_rows or self._kept == limit:
                    yield chunk
                    chunk = self._empty_chunk()
                if self._kept == limit:
                    return
        if chunk.texts:
            yield chunk

    def _empty_chunk(self) -> Chunk:
        return Chunk([], [] if self.pair_column else None, [] if self.label_column else None, [])

    def _batches(self, cols: list[str], rows: int) -> Iterator[dict[str, list]]:
        if self._reader is not None:
            return self._reader.batches(cols, rows)
        return ({"text": list(self._texts[i:i + rows])} for i in range(0, len(self._texts), rows))

    def stats(self) -> dict:
        """What the last pass of ``chunks()`` read, kept and skipped (by reason), and the file's sha256."""
        return {"name": self.name, "path": self.path, "format": self.format, "rows_read": self._read,
                "rows_kept": self._kept, "rows_skipped": dict(self._skipped),
                "sha256": self._reader.sha256() if self._reader else None,
                "text_column": self.text_column, "pair_column": self.pair_column,
                "label_column": self.label_column, "encoding": self.encoding}


def open_source(path: str | None = None, texts: Sequence[str] = (), *, text_column: str | None = None,
                text_pair_column: str | None = None, label_column: str | None = None,
                encoding: str = "utf-8", need_labels: bool = False) -> TextSource:
    """Check a data file (or inline ``texts``, or with neither the sample corpus) and find its columns.

    Everything that can be checked without reading the whole file is checked here: the file exists and
    is not empty or blank, the format is known, the columns can be read, the text column is found (or
    given) and the given columns exist. With ``need_labels`` a label column must exist, and rows without
    a label are skipped (reason ``"missing label"``).

    >>> src = open_source(texts=["A cat sat.", "   ", "It slept."])
    >>> [chunk.texts for chunk in src.chunks()]
    [['A cat sat.', 'It slept.']]
    >>> src.stats()["rows_skipped"]
    {'empty text': 1}
    """
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise AttnprobeError(f"unknown --encoding {encoding!r}; pass a Python codec name such as utf-8, "
                             "latin-1 or cp1252") from None
    if path is not None and texts:
        raise AttnprobeError("pass either a data file or texts, not both")
    if isinstance(texts, str):
        texts = [texts]
    if texts:
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        if not any(t.strip() for t in texts):
            raise AttnprobeError("every --text given is blank; pass at least one non-empty text")
        text, pair, label = _resolve_columns("--text", ["text"], text_column, text_pair_column, label_column,
                                             need_labels)
        return TextSource("<--text>", None, "inline", ["text"], text, pair, label, None, texts=texts,
                          need_labels=need_labels)
    if path is None:
        name, fmt, file_path, encoding = "<sample>", "sample", None, "utf-8"
        reader = FormatReader("tsv", name, _open_sample, None, encoding)
    else:
        name, p = str(path), Path(path)
        if not p.exists():
            raise AttnprobeError(f"data file {name} does not exist; check the path")
        if p.is_dir():
            fmt = dataset_folder(name)
        elif not p.is_file():
            raise AttnprobeError(f"{name} is not a file; pass a data file: {_KNOWN_FORMATS}")
        else:
            fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise AttnprobeError(f"{name} has an unknown extension {p.suffix or '(none)'!r}; "
                                 f"pass a {_KNOWN_FORMATS} file")
        if fmt != "arrow" and p.stat().st_size == 0:
            raise AttnprobeError(f"{name} is empty; pass a file with at least one text")
        file_path = name
        reader = FormatReader(fmt, name, lambda: open(p, "rb"), file_path, encoding)
    columns = reader.columns()
    text, pair, label = _resolve_columns(name, columns, text_column, text_pair_column, label_column,
                                         need_labels)
    return TextSource(name, file_path, fmt, columns, text, pair, label,
                      None if fmt in ("parquet", "arrow") else encoding, reader=reader, pairs_optional=path is None,
                      need_labels=need_labels)


def dataset_folder(name: str) -> str:
    """``"arrow"`` for a folder saved with ``datasets``' ``save_to_disk`` (``state.json`` and ``data-*.arrow``
    files); a one-line error for a folder of splits (``dataset_dict.json``) or any other folder."""
    p = Path(name)
    if (p / "dataset_dict.json").is_file():
        splits = sorted(c.name for c in p.iterdir() if c.is_dir())
        raise AttnprobeError(f"{name} holds several splits ({list_names(splits)}); pass one of them, "
                             f"e.g. {p / (splits[0] if splits else 'train')}")
    if (p / "state.json").is_file() or any(p.glob("data-*.arrow")):
        return "arrow"
    raise AttnprobeError(f"{name} is not a file, nor a folder written by datasets' save_to_disk (no state.json or "
                         f"data-*.arrow); pass a data file: {_KNOWN_FORMATS}")


def read_rows(path: str, columns: Sequence[str] | None = None, *,
              encoding: str = "utf-8") -> tuple[list[str], list[dict], dict]:
    """Every row of a .jsonl, .csv/.tsv, .parquet file or ``save_to_disk`` folder as a dict of raw values
    (lists and nested records as Python lists and dicts), for tasks whose rows are not one text and a label.

    Returns ``(columns of the file, rows, stats)``; ``columns`` picks which to read (default all).
    """
    name, p = str(path), Path(path)
    if not p.exists():
        raise AttnprobeError(f"data file {name} does not exist; check the path")
    if p.is_dir():
        fmt = dataset_folder(name)
    else:
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None or fmt == "txt":
            raise AttnprobeError(f"{name} has an unsupported extension {p.suffix or '(none)'!r} here; pass a .jsonl, "
                                 ".json, .parquet or .csv/.tsv file, or a folder written by datasets' save_to_disk")
        if p.stat().st_size == 0:
            raise AttnprobeError(f"{name} is empty; pass a file with data")
    reader = FormatReader(fmt, name, lambda: open(p, "rb"), name, encoding)
    found = reader.columns()
    wanted = [c for c in (columns or found) if c in found]
    rows: list[dict] = []
    for batch in reader.batches(wanted, 2048):
        rows += [dict(zip(wanted, values)) for values in zip(*(batch[c] for c in wanted))]
    stats = {"name": name, "path": name, "format": fmt, "rows_read": len(rows), "sha256": reader.sha256(),
             "encoding": None if fmt in ("parquet", "arrow") else encoding}
    return found, rows, stats


def _open_sample() -> BinaryIO:
    from importlib.resources import files

    return files("attnprobe.data").joinpath(SAMPLE_CORPUS).open("rb")


def sample_source() -> TextSource:
    """The built-in sample corpus: single sentences and sentence pairs (``sentence1``, ``sentence2``)."""
    return open_source()


@dataclass
class LabeledData:
    """A labelled data set held in memory (for refine); ``label_ids[i]`` indexes ``label_names``."""

    texts: list[str]
    pairs: list[str] | None
    label_ids: list[int]
    label_names: list[str]
    stats: dict


def _label_key(name: str, value: Any) -> int | str:
    if isinstance(value, str):
        return int(value) if _INTEGER.fullmatch(value) else value
    if isinstance(value, int):
        return value
    raise AttnprobeError(f"{name} has a label {value!r} that is not a class name or an integer; "
                         "refine does classification, so pass --label-column with class labels")


def read_labeled(path: str, *, text_column: str | None = None, text_pair_column: str | None = None,
                 label_column: str | None = None, encoding: str = "utf-8", limit: int | None = None,
                 label_names: list[str] | None = None, min_classes: int = 2) -> LabeledData:
    """Read a labelled file into memory and map its labels to ids.

    Integer labels (or strings that are all integers, ``"0"``, ``"1"``) keep their value as id, named
    ``str(i)`` for 0..max; other labels get ids in sorted order of their names. With ``label_names`` (the
    training file's mapping) every label must be one of those names. Rows without a label are skipped.
    """
    source = open_source(path, text_column=text_column, text_pair_column=text_pair_column,
                         label_column=label_column, encoding=encoding, need_labels=True)
    texts: list[str] = []
    pairs: list[str] | None = [] if source.pair_column else None
    raw: list = []
    for chunk in source.chunks(limit=limit):
        texts += chunk.texts
        raw += chunk.labels
        if pairs is not None:
            pairs += chunk.pairs
    stats = source.stats()
    if not texts:
        raise AttnprobeError(f"{source.name} has no rows with both a text and a label "
                             f"(skipped: {stats['rows_skipped']}); check --text-column and --label-column")
    keys = [_label_key(source.name, v) for v in raw]
    if all(isinstance(k, int) for k in keys) and min(keys) >= 0:
        distinct = len(set(keys))
        if max(keys) >= 10 * distinct + 1000:  # ids are used as given: one stray huge id, one huge head
            raise AttnprobeError(f"integer labels in {source.name} go up to {max(keys)} but only {distinct} "
                                 "values occur; number the classes from 0 or use class names")
        names = [str(i) for i in range(max(keys) + 1)]
    else:
        keys = [str(k) for k in keys]
        names = sorted(set(keys), key=lambda k: (0, int(k), "") if _INTEGER.fullmatch(k) else (1, 0, k))
    if label_names is not None:
        unseen = sorted({str(k) for k in keys} - set(label_names))
        if unseen:
            raise AttnprobeError(f"eval file {source.name} has labels the training file never had: "
                                 f"{list_names(unseen, 10)} (training labels: "
                                 f"{list_names(list(label_names), 10)}); use files with the same label set")
        names = list(label_names)
    index = {n: i for i, n in enumerate(names)}
    ids = [index[str(k)] for k in keys]
    counts = Counter(str(k) for k in keys)
    if len(counts) < min_classes:
        found = list_names(sorted(counts), 10)
        what = f"are all one class ({found})" if len(counts) == 1 else f"have {len(counts)} classes ({found})"
        raise AttnprobeError(f"labels in {source.name} {what}; a classifier needs at least {min_classes} "
                             "classes, so check --label-column or the file")
    stats["label_counts"] = {n: counts.get(n, 0) for n in names}
    return LabeledData(texts, pairs, ids, names, stats)
