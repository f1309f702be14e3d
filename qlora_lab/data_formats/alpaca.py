"""alpaca: {instruction, input, output} (+ optional system, history = earlier [prompt, response] pairs)."""

from __future__ import annotations

from ..config import ConfigError, DataFormat, DatasetConfig
from . import DataFormatSpec
from .fields import present, text_field


def check_columns(records: list[dict], d: DatasetConfig, source: str) -> None:
    """Alpaca: the required columns exist somewhere in the file, and no mapped column holds a list or dict."""
    cols = d.columns
    keys = {k for r in records for k in r}
    for role, col in (("instruction", cols.instruction), ("output", cols.output)):
        if col not in keys:
            raise ConfigError(
                f"{source}: no column {col!r} (dataset.columns.{role}); the file has "
                f"{', '.join(map(str, records[0]))}; set dataset.columns.{role} to one of them, or "
                f"dataset.format to the file's format."
            )


def from_alpaca(record: dict, cols, key: str | None, where: str, need_answer: bool = True) -> dict:
    """instruction (+ input) -> user, output -> assistant; optional `system`, and `history`: earlier [prompt,
    response] pairs."""
    for role, col in (("instruction", cols.instruction), ("input", cols.input), ("output", cols.output)):
        value = record.get(col) if col else None
        if isinstance(value, (list, dict)):
            kind = "list" if isinstance(value, list) else "dict"
            raise ConfigError(
                f"{where}'s {col!r} column (dataset.columns.{role}) holds a {kind}, not text (a "
                f"conversation?); map dataset.columns.{role} to a text column, or set dataset.format "
                f"to the conversation format it is in."
            )
        if (role == "instruction" or (role == "output" and need_answer)) and not present(value):
            raise ConfigError(
                f"{where} has an empty or missing {col!r} field (dataset.columns.{role}); fix or remove "
                f"that record."
            )
    messages = []
    if cols.system and present(record.get(cols.system)):
        messages.append({"role": "system", "content": text_field(record[cols.system], where, cols.system)})
    history = record.get(cols.history) if cols.history else None
    for j, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ConfigError(
                f"{where}'s {cols.history}[{j}] is not a [prompt, response] pair of strings; fix it or "
                f"set dataset.columns.history=null."
            )
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = str(record[cols.instruction])
    extra = record.get(cols.input) if cols.input else None
    if present(extra):
        user = f"{user}\n\n{extra}"
    messages.append({"role": "user", "content": user})
    if present(record.get(cols.output)):
        messages.append({"role": "assistant", "content": str(record[cols.output])})
    return {"messages": messages, "tools": None}


FORMAT = DataFormatSpec(
    DataFormat.alpaca,
    doc="an {key!r} column",
    needs="needs an {key!r} column (dataset.columns.instruction)",
    convert=from_alpaca,
    column=lambda cols: cols.instruction,
    check=check_columns,
)
