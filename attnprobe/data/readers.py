"""Turning a data file's bytes into batches of raw cell values, for each format: txt, csv, tsv, jsonl, parquet,
and a folder written by Hugging Face ``datasets``' ``save_to_disk`` (``arrow``).

Batches are read one at a time so memory holds one batch; text is decoded line by line so an encoding error
names its line, and the bytes read are hashed on the way. This module does not choose columns, clean values
or skip rows (data.py does). Only the standard library is imported at module level: pandas and pyarrow are
loaded when a file of theirs is read.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

from attnprobe.errors import AttnprobeError

PEEK_JSON_OBJECTS = 100  # objects read up front to learn a .jsonl file's keys


def list_names(names: Sequence[str], most: int = 20) -> str:
    """``"a, b, c"``, cut after ``most`` names."""
    shown = ", ".join(str(n) for n in names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` items (the last may be shorter)."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


class DecodingReader(io.TextIOBase):
    """A text stream over a binary file that decodes one line at a time, so an encoding error names its
    line, and feeds every byte it reads to sha256 (the file's hash once ``at_eof``)."""

    def __init__(self, raw: BinaryIO, name: str, encoding: str):
        self._raw, self._name, self._encoding = raw, name, encoding
        self._decoder = codecs.getincrementaldecoder(encoding)()
        self._pending = ""
        self.sha = hashlib.sha256()
        self.raw_lines = 0
        self.at_eof = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()

    def _next_text(self) -> str:
        raw = self._raw.readline()
        self.sha.update(raw)
        self.raw_lines += bool(raw)
        self.at_eof = not raw
        try:
            text = self._decoder.decode(raw, final=self.at_eof)
        except UnicodeDecodeError as exc:
            raise AttnprobeError(
                f"{self._name} line {self.raw_lines} is not valid {self._encoding} ({exc.reason}, byte "
                f"{exc.object[exc.start:exc.start + 1]!r}); pass --encoding latin-1 (or the file's encoding)"
            ) from None
        return text.removeprefix("\ufeff") if self.raw_lines == 1 else text  # a UTF-8 BOM is not text

    def read(self, size: int | None = -1) -> str:
        parts, n = [self._pending], len(self._pending)
        while (size is None or size < 0 or n < size) and not self.at_eof:
            parts.append(self._next_text())
            n += len(parts[-1])
        data = "".join(parts)
        cut = len(data) if size is None or size < 0 else size
        data, self._pending = data[:cut], data[cut:]
        return data

    def lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, line without its newline) for every line of the file."""
        buf, number = "", 0
        while not self.at_eof:
            buf += self._next_text()
            *complete, buf = buf.split("\n")  # one line per step, except in encodings such as UTF-16
            for line in complete:
                number += 1
                yield number, line
        if buf:
            yield number + 1, buf


def json_object(name: str, number: int, line: str) -> dict:
    """One line of a .jsonl file, which must be a JSON object."""
    example = 'each line must be one JSON object such as {"text": "..."}'
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AttnprobeError(f"{name} line {number} is not valid JSON: {exc.msg} (column {exc.colno}); "
                             f"{example}") from None
    if not isinstance(obj, dict):
        raise AttnprobeError(f"{name} line {number} is not valid JSON Lines: a JSON {type(obj).__name__}, "
                             f"not an object; {example}")
    return obj


def read_table(reader: io.TextIOBase, name: str, fmt: str, **kwargs: Any) -> Iterator:
    """pandas.read_csv frames with this module's settings: every cell a str and only empty cells missing;
    a row with extra fields is an error (never a silent shift of the first column into the index);
    .tsv as GLUE ships it (tab, header row, quotes kept as text)."""
    import pandas as pd

    sep, quoting = ("\t", csv.QUOTE_NONE) if fmt == "tsv" else (",", csv.QUOTE_MINIMAL)
    try:
        frames = pd.read_csv(reader, sep=sep, quoting=quoting, dtype=str, keep_default_na=False,
                             na_values=[], skip_blank_lines=True, index_col=False, **kwargs)
        if "chunksize" not in kwargs:
            yield frames
            return
        with frames:
            yield from frames
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        hint = ("tabs separate columns and quotes are kept as text" if fmt == "tsv"
                else "commas separate columns and fields with commas are quoted")
        raise AttnprobeError(f"{name} is not a well-formed {fmt.upper()} file ({first_line(exc)}); "
                             f"check that {hint}, or convert it to .jsonl") from None


def _parquet_error(name: str, exc: BaseException) -> AttnprobeError:
    return AttnprobeError(f"{name} is not a readable Parquet file ({first_line(exc)}); write it with "
                          "pandas.DataFrame.to_parquet or pyarrow, or pass a .csv/.jsonl file")


def dataset_files(folder: str) -> list[str]:
    """The Arrow files of a ``save_to_disk`` folder in order: ``state.json``'s ``_data_files`` where it
    lists them, else ``data-*.arrow`` sorted by name. Each is an Arrow IPC stream."""
    from pathlib import Path

    root = Path(folder)
    try:
        state = json.loads((root / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state.get("_data_files", [])]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    files = [str(root / n) for n in names] or sorted(str(p) for p in root.glob("data-*.arrow"))
    if not files:
        raise AttnprobeError(f"{folder} holds no data-*.arrow files; pass a folder written by "
                             "datasets' save_to_disk, or a data file")
    return files


def _arrow_streams(folder: str):
    """``(file, pyarrow.ipc reader)`` per Arrow file of a ``save_to_disk`` folder."""
    import pyarrow as pa

    for path in dataset_files(folder):
        try:
            with pa.memory_map(path) as source:
                yield path, pa.ipc.open_stream(source)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise AttnprobeError(f"{path} is not a readable Arrow stream ({first_line(exc)}); "
                                 "write the folder with datasets' save_to_disk") from None


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


class FormatReader:
    """Reads one file of one format (``"txt"``, ``"csv"``, ``"tsv"``, ``"jsonl"`` or ``"parquet"``).

    ``path`` is None for package data opened through ``open_bytes`` (then no hash is reported).
    """

    def __init__(self, fmt: str, name: str, open_bytes: Callable[[], BinaryIO], path: str | None,
                 encoding: str):
        self.fmt, self.name, self.path, self.encoding = fmt, name, path, encoding
        self._open_bytes = open_bytes
        self._sha: str | None = None

    def _arrow_columns(self) -> list[str]:
        names, rows = None, 0
        for _, reader in _arrow_streams(self.path):
            names = names or list(reader.schema.names)
            rows += sum(batch.num_rows for batch in reader)
            if rows:
                break
        if not rows:
            raise AttnprobeError(f"{self.name} has no rows (columns: {list_names(names or [])}); "
                                 "pass a data set with data")
        return names

    def _parquet(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise _parquet_error(self.name, exc) from None

    def columns(self) -> list[str]:
        """The file's columns (``["text"]`` for .txt), after checking that it holds at least one row.

        Reads only the start of the file: the header, the Parquet footer, or the first
        ``PEEK_JSON_OBJECTS`` objects of a .jsonl file (whose keys, in order of appearance, are its columns).
        """
        if self.fmt == "arrow":
            return self._arrow_columns()
        if self.fmt == "parquet":
            with self._parquet() as pf:
                names, num_rows = list(pf.schema_arrow.names), pf.metadata.num_rows
            if num_rows == 0:
                raise AttnprobeError(f"{self.name} has no rows (columns: {list_names(names)}); "
                                     "pass a file with data")
            return names
        with DecodingReader(self._open_bytes(), self.name, self.encoding) as reader:
            lines = ((n, line) for n, line in reader.lines() if line.strip())
            first = next(lines, None)
            if first is None:
                raise AttnprobeError(f"{self.name} has only blank lines; pass a file with at least one text")
            if self.fmt == "txt":
                return ["text"]
            if self.fmt == "jsonl":
                keys: dict[str, None] = {}
                for number, line in itertools.islice(itertools.chain([first], lines), PEEK_JSON_OBJECTS):
                    keys.update(dict.fromkeys(json_object(self.name, number, line)))
                return list(keys)
        with DecodingReader(self._open_bytes(), self.name, self.encoding) as reader:
            head = next(read_table(reader, self.name, self.fmt, nrows=1))
        if len(head) == 0:
            raise AttnprobeError(f"{self.name} has a header row ({list_names(list(head.columns))}) but no data "
                                 "rows; pass a file with data")
        return [str(c) for c in head.columns]

    def batches(self, cols: Sequence[str], rows: int) -> Iterator[dict[str, list]]:
        """The raw values of ``cols`` (a missing .jsonl key gives None), ``rows`` data rows at a time.
        .txt lines are rows (blank ones too); blank .jsonl lines are not."""
        if self.fmt == "arrow":
            for _, reader in _arrow_streams(self.path):
                for batch in reader:
                    for start in range(0, batch.num_rows, rows):
                        part = batch.slice(start, rows)
                        yield {c: part.column(c).to_pylist() for c in cols}
            return
        if self.fmt == "parquet":
            with self._parquet() as pf:
                try:
                    for batch in pf.iter_batches(batch_size=rows, columns=list(dict.fromkeys(cols))):
                        yield {c: batch.column(c).to_pylist() for c in cols}
                except (OSError, ValueError) as exc:
                    raise _parquet_error(self.name, exc) from None
            return
        with DecodingReader(self._open_bytes(), self.name, self.encoding) as reader:
            if self.fmt == "txt":
                for batch in batched((line for _, line in reader.lines()), rows):
                    yield {"text": batch}
            elif self.fmt == "jsonl":
                objs = (json_object(self.name, n, line) for n, line in reader.lines() if line.strip())
                for batch in batched(objs, rows):
                    yield {c: [obj.get(c) for obj in batch] for c in cols}
            else:
                for df in read_table(reader, self.name, self.fmt, chunksize=rows):
                    yield {c: df[c].tolist() for c in cols}
            if reader.at_eof and self.path is not None:
                self._sha = reader.sha.hexdigest()

    def sha256(self) -> str | None:
        """The file's sha256: from the last complete pass of ``batches``, else from a pass of its own."""
        if self._sha is None and self.path is not None and self.fmt == "arrow":  # the data files' hashes, hashed
            self._sha = hashlib.sha256("".join(file_sha256(f) for f in dataset_files(self.path)).encode()).hexdigest()
        elif self._sha is None and self.path is not None:
            self._sha = file_sha256(self.path)
        return self._sha
