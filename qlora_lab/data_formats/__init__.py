"""Data formats (dataset.format): one file per format, each holding one DataFormatSpec: how a record in it is
recognised (dataset.format=auto), its config check, its converter to the canonical row (qlora_lab/data.py) and
its doc line. A new format: a file here, a DataFormat member in config.py, and its FORMAT added to FORMATS
below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import DataFormat


@dataclass(frozen=True)
class DataFormatSpec:
    format: DataFormat
    doc: str  # what shows the format, with {key} the column: "a {key!r} list of {{role, content}}"
    needs: str  # the same, in the sentence that lists what each format needs
    # (record, dataset.columns, column of turns or None, "file: record i", need_answer) -> canonical row
    convert: Callable[..., dict]
    turns_column: str | None = None  # a conversation format: the default column of its list of turns
    first_turn_keys: tuple[str, ...] = ()  # a conversation format: keys of a turn that show it
    column: Callable[[Any], str] | None = (
        None  # a column format: the column (from dataset.columns) that shows it
    )
    check: Callable[..., None] | None = (
        None  # (records, DatasetConfig, source): the whole file against the config
    )

    def key(self, cols) -> str:
        return self.column(cols) if self.column else self.turns_column

    def describe(self, key: str) -> str:
        return f"{self.format.value} ({self.doc.format(key=key)})"

    def needs_line(self, cols) -> str:
        return f"{self.format.value} {self.needs.format(key=self.key(cols))}"


def _formats() -> dict[DataFormat, DataFormatSpec]:
    from . import alpaca, openai, sharegpt, xtuner

    return {spec.format: spec for spec in (alpaca.FORMAT, openai.FORMAT, sharegpt.FORMAT, xtuner.FORMAT)}


FORMATS = _formats()  # detection tries them in this order
CONVERSATIONAL = [spec for spec in FORMATS.values() if spec.turns_column]


def detect(record: dict, cols) -> tuple[DataFormat, str] | None:
    """The format one record is written in and the column that shows it (None: no format), from its keys and
    the shape of its list of turns: a 'conversations' list of {role, content} is openai, whatever its name."""
    for spec in FORMATS.values():
        if spec.column and record.get(spec.column(cols)) is not None:
            return spec.format, spec.column(cols)
    for key in [cols.messages] if cols.messages else [spec.turns_column for spec in CONVERSATIONAL]:
        turns = record.get(key)
        if not isinstance(turns, list):
            continue
        first = turns[0] if turns and isinstance(turns[0], dict) else {}
        for spec in CONVERSATIONAL:
            if any(k in first for k in spec.first_turn_keys):
                return spec.format, key
        # an empty or odd list: the format whose column it is, else the first conversation format
        return next(
            (s.format for s in CONVERSATIONAL if s.turns_column == key), CONVERSATIONAL[0].format
        ), key
    return None
