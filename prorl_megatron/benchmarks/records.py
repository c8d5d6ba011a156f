"""Reading a benchmark's file as published, and what every loader shares.

A loader is one function per record format, ``convert(record, index, options) -> PromptRow``: it
reads the record's fields, builds the prompt (the benchmark's template, cited where it comes
from) and the ground truth of the domain's verifier, and raises
:class:`~prorl_megatron.data.schema.BadRow` naming the field it could not use.
:func:`load_benchmark` runs it over a file: every row it cannot use stops the load with the file,
row and field (:class:`~prorl_megatron.data.dataset.DataError`), or, with ``on_bad_row="skip"``, is
counted and reported; it also records which record fields the loader read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prorl_megatron.data.dataset import DataError, read_records
from prorl_megatron.data.schema import BadRow, PromptRow

log = logging.getLogger(__name__)

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class LoadOptions:
    """What a loader takes from the protocol (:class:`prorl_megatron.config.BenchmarkConfig`)."""

    instructions: bool = True  # append the benchmark's answer-format instruction to the problem
    choice_seed: int = 0  # multiple choice: the seed of the answer-order permutations


Converter = Callable[[dict, int, LoadOptions], PromptRow]


@dataclass
class Loaded:
    """One benchmark file, converted: its rows, what was skipped, which record fields were read."""

    name: str
    path: Path
    sha256: str
    rows: list[PromptRow]
    skipped: list[str] = field(default_factory=list)  # "file: row N: problem", one per skipped row
    fields: list[str] = field(default_factory=list)  # record fields the loader read, in first-read order


class TrackedRecord(dict):
    """A source record that remembers which of its fields were read (by ``[]`` or ``get``)."""

    def __init__(self, data: dict, read: dict[str, None]) -> None:
        super().__init__(data)
        self._read = read

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        self._read.setdefault(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self._read.setdefault(key)
        return super().get(key, default)


def first_field(record: dict, *names: str) -> Any:
    """The value of the first of ``names`` the record has, not empty; :class:`BadRow` naming them all if none."""
    for name in names:
        value = record.get(name)
        if value is not None and value != "" and value != []:
            return value
    raise BadRow("/".join(names), "missing in the source record" if len(names) == 1 else
                 "none of these fields is in the source record")


def json_value(value: Any, name: str) -> Any:
    """``value`` decoded when it is a JSON string (published files nest JSON in string columns)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise BadRow(name, f"not valid JSON ({e})") from None


def read_published(path: Path) -> list[Any]:
    """The records of a local benchmark file as published: JSON lines (``.jsonl``, ``.json``), a JSON
    array (``.json``), parquet, or CSV with a header row (``.csv``, all values text)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: benchmark file not found")
    if suffix not in FILE_TYPES:
        raise DataError(f"{path}: unsupported benchmark file type {suffix!r} (use {', '.join(FILE_TYPES)})")
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                return json.loads(text)
            except ValueError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
    return read_records(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_benchmark(name: str, path: Path, convert: Converter, options: LoadOptions, on_bad_row: str = "error",
                   records: Optional[list[Any]] = None) -> Loaded:
    """Convert every record of ``path`` (or the given ``records``, generated from it) with ``convert``.

    Row ``N`` (from 1) is the file's Nth record; each row's id is ``"{name}/{N}"`` and its source
    ``"{path}: row N"``. A record that cannot be converted raises :class:`DataError` naming the file,
    row and field, or with ``on_bad_row="skip"`` is listed in :attr:`Loaded.skipped` and logged.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row: expected 'error' or 'skip', got {on_bad_row!r}")
    read: dict[str, None] = {}
    loaded = Loaded(name, path, file_sha256(path), rows=[])
    for number, raw in enumerate(read_published(path) if records is None else records, start=1):
        where = f"{path}: row {number}"
        try:
            if not isinstance(raw, dict):
                raise BadRow("(row)", f"a JSON object is required, got {type(raw).__name__}")
            row = convert(TrackedRecord(raw, read), number - 1, options)
        except BadRow as e:
            if on_bad_row == "error":
                raise DataError(f"{where}: {e}") from None
            loaded.skipped.append(f"{where}: {e}")
            log.warning("%s: skipped bad row %s: %s", name, where, e)
            continue
        row.id, row.source = f"{name}/{number}", where
        loaded.rows.append(row)
    loaded.fields = list(read)
    if not loaded.rows:
        raise DataError(f"{path}: no usable rows" + (f" ({len(loaded.skipped)} skipped)" if loaded.skipped else ""))
    return loaded
