"""Reading the fields of a record, shared by the format converters: each problem named by record and field."""

from __future__ import annotations

import json

from ..config import ConfigError

ROLES = ("system", "user", "assistant", "tool")


def present(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def text_field(value, where: str, name: str) -> str:
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}'s {name} holds a {type(value).__name__}, not text; write it as a string.")
    return "" if value is None else str(value)


def json_field(value, where: str, name: str):
    """A value that may be written as JSON text (tools, function-call arguments): parsed, or named if
    broken."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{where}'s {name} is not valid JSON ({e.msg} at column {e.colno}); fix that value."
        ) from None


def tools_field(record: dict, cols, where: str) -> list | None:
    if not cols.tools or not present(record.get(cols.tools)):
        return None
    tools = json_field(record[cols.tools], where, cols.tools)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConfigError(
            f"{where}'s {cols.tools} is not a list of function schemas (JSON objects); fix it or set "
            f"dataset.columns.tools=null to leave tools out."
        )
    return tools or None


def tool_call(call, where: str, name: str) -> dict:
    """One function call, OpenAI's {type, function: {name, arguments}} or a bare {name, arguments}, in
    canonical form (arguments a dict, as chat templates render them)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ConfigError(
            f'{where}\'s {name} is not a function call {{"name": ..., "arguments": {{...}}}}; fix it.'
        )
    arguments = json_field(fn.get("arguments", {}), where, f"{name}.arguments")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
    return out | ({"id": call["id"]} if isinstance(call, dict) and call.get("id") else {})


def turns_list(record: dict, key: str, where: str) -> list:
    turns = record.get(key)
    if not isinstance(turns, list):
        what = "missing" if turns is None else f"a {type(turns).__name__}, not a list"
        raise ConfigError(
            f"{where}'s {key!r} (dataset.columns.messages) is {what}; give every record a list of turns."
        )
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConfigError(
                f"{where}'s {key}[{j}] is a {type(turn).__name__}, not a JSON object; fix that turn."
            )
    return turns


def content_text(content, where: str, name: str) -> str:
    """A message's content: a string, or a list of typed parts of which only text parts are read. A text part
    holds its text in `text` (OpenAI) or `value` (LLaMA-Factory)."""
    if not isinstance(content, list):
        return text_field(content, where, name)
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict):
            raise ConfigError(
                f'{where}\'s {name}[{k}] is a {type(part).__name__}, not a part {{"type": "text", '
                f'"text": ...}}; fix that part.'
            )
        kind = part.get("type")
        if kind != "text":
            raise ConfigError(
                f"{where}'s {name}[{k}] is a part of type {kind!r}; only text parts are read, so remove "
                f"it or the record."
            )
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            raise ConfigError(
                f"{where}'s {name}[{k}] is a text part with no string in 'text' or 'value' (its keys: "
                f"{', '.join(map(str, part))}); write the text there."
            )
        texts.append(text)
    return "\n\n".join(texts)


def loss_weight(turn: dict, role: str, where: str, name: str) -> dict:
    """A turn's `loss_weight` (LLaMA-Factory): 0 leaves an assistant turn out of the loss (it stays as
    context), 1 trains it as usual. Returned as {"loss_weight": 0} for the canonical message, or {}."""
    if "loss_weight" not in turn or turn["loss_weight"] is None:
        return {}
    weight = turn["loss_weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ConfigError(
            f"{where}'s {name}.loss_weight is {weight!r}; it must be 0 (not trained) or 1 (trained), "
            f"so fix that turn."
        )
    if role != "assistant" and weight == 1:
        raise ConfigError(
            f"{where}'s {name}.loss_weight is 1 on a {role} turn, but only assistant turns are trained "
            f"(dataset.train_on_prompt=true trains every token); set it to 0 or remove it."
        )
    return {"loss_weight": 0} if weight == 0 and role == "assistant" else {}
