"""sharegpt: {conversations: [{from, value}], system, tools} (LLaMA-Factory's sharegpt, function calls
included)."""

from __future__ import annotations

from ..config import ConfigError, DataFormat
from . import DataFormatSpec
from .fields import json_field, loss_weight, present, text_field, tool_call, tools_field, turns_list

SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
}


def from_sharegpt(record: dict, cols, key: str, where: str, need_answer: bool = True) -> dict:
    turns = turns_list(record, key, where)
    messages = []
    if cols.system and present(record.get(cols.system)):
        messages.append({"role": "system", "content": text_field(record[cols.system], where, cols.system)})
    for j, turn in enumerate(turns):
        name = f"{key}[{j}]"
        sender = turn.get("from")
        if sender not in SHAREGPT_ROLES:
            raise ConfigError(
                f"{where}'s {name}.from is {sender!r}, not one of {', '.join(SHAREGPT_ROLES)}; fix that turn."
            )
        value = text_field(turn.get("value"), where, f"{name}.value")
        if sender == "function_call":
            calls = json_field(value, where, f"{name}.value")
            calls = calls if isinstance(calls, list) else [calls]
            messages.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [tool_call(c, where, f"{name}.value") for c in calls],
                }
                | loss_weight(turn, "assistant", where, name)
            )
        else:
            role = SHAREGPT_ROLES[sender]
            messages.append({"role": role, "content": value} | loss_weight(turn, role, where, name))
    return {"messages": messages, "tools": tools_field(record, cols, where)}


FORMAT = DataFormatSpec(
    DataFormat.sharegpt,
    doc="a {key!r} list of {{from, value}}",
    needs="a {key!r} list",
    convert=from_sharegpt,
    turns_column="conversations",
    first_turn_keys=("from",),
)
