"""xtuner: {conversation: [{system, input, output}]}, one dict per turn."""

from __future__ import annotations

from ..config import ConfigError, DataFormat
from . import DataFormatSpec
from .fields import present, text_field, turns_list


def from_xtuner(record: dict, cols, key: str, where: str, need_answer: bool = True) -> dict:
    turns = turns_list(record, key, where)
    messages = []
    for j, turn in enumerate(turns):
        name = f"{key}[{j}]"
        if present(turn.get("system")):
            messages.append(
                {"role": "system", "content": text_field(turn["system"], where, f"{name}.system")}
            )
        for field_name, role in (("input", "user"), ("output", "assistant")):
            if (
                field_name == "output"
                and not need_answer
                and j == len(turns) - 1
                and not present(turn.get("output"))
            ):
                continue  # a prompt: the last turn's answer is what is to be generated
            if not present(turn.get(field_name)):
                raise ConfigError(
                    f"{where}'s {name}.{field_name} is empty or missing; fix or remove that record."
                )
            messages.append(
                {"role": role, "content": text_field(turn[field_name], where, f"{name}.{field_name}")}
            )
    return {"messages": messages, "tools": None}


FORMAT = DataFormatSpec(
    DataFormat.xtuner,
    doc="a {key!r} list of {{input, output}}",
    needs="a {key!r} list",
    convert=from_xtuner,
    turns_column="conversation",
    first_turn_keys=("input", "output"),
)
