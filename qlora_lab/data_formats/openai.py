"""openai: {messages: [{role, content, tool_calls}], tools}, as OpenAI's chat API and transformers' chat
templates."""

from __future__ import annotations

from ..config import ConfigError, DataFormat
from . import DataFormatSpec
from .fields import ROLES, content_text, loss_weight, tool_call, tools_field, turns_list


def from_openai(record: dict, cols, key: str, where: str, need_answer: bool = True) -> dict:
    turns = turns_list(record, key, where)
    messages = []
    for j, turn in enumerate(turns):
        name = f"{key}[{j}]"
        role = turn.get("role")
        if role not in ROLES:
            raise ConfigError(
                f"{where}'s {name}.role is {role!r}, not one of {', '.join(ROLES)}; fix that turn."
            )
        message = {"role": role, "content": content_text(turn.get("content"), where, f"{name}.content")}
        message |= loss_weight(turn, role, where, name)
        if role == "assistant" and turn.get("tool_calls"):
            calls = turn["tool_calls"]
            if not isinstance(calls, list):
                raise ConfigError(f"{where}'s {name}.tool_calls is not a list of calls; fix that turn.")
            message["tool_calls"] = [
                tool_call(c, where, f"{name}.tool_calls[{k}]") for k, c in enumerate(calls)
            ]
        if role == "tool":
            message |= {k: str(turn[k]) for k in ("name", "tool_call_id") if turn.get(k)}
        messages.append(message)
    return {"messages": messages, "tools": tools_field(record, cols, where)}


FORMAT = DataFormatSpec(
    DataFormat.openai,
    doc="a {key!r} list of {{role, content}}",
    needs="a {key!r} list",
    convert=from_openai,
    turns_column="messages",
    first_turn_keys=("role",),
)
