"""What goes in is what is trained: for every documented record format, the text in the file is read here on
its own (not through qlora_lab's converters) and compared with what the model is given and with the trained
label spans. A field the reader drops in silence makes the model's text lack one of the file's strings, and an
assistant text that is not trained (or a trained span with no assistant text behind it) makes the spans
disagree."""

from __future__ import annotations

import json

import pytest

from qlora_lab.data import IGNORE_INDEX, load_conversations, tokenize_example

from .conftest import TINY, make_cfg

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
# Structural keys: their values name a role or a kind of part, not text the model is trained on.
STRUCTURAL = {"role", "from", "type", "loss_weight"}

RECORDS = {
    "alpaca": [
        {
            "system": "Answer briefly.",
            "history": [["What is 2+2?", "It is 4."]],
            "instruction": "And 3+3?",
            "input": "Count on your fingers.",
            "output": "It is 6.",
        },
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": json.dumps(CALL)},
                {"from": "observation", "value": '{"temp": 18}'},
                {"from": "gpt", "value": "18 degrees in Paris."},
            ],
            "system": "Use the tools.",
            "tools": json.dumps(TOOLS),
        },
        # loss_weight 0 keeps a turn as context (a turn after the last trained one affects no loss, and
        # is left out of the text)
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello there.", "loss_weight": 0},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye."},
            ]
        },
    ],
    "openai": [
        {
            "messages": [
                {"role": "system", "content": "Use the tools."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Weather"}, {"type": "text", "value": "in Paris?"}],
                },
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": json.dumps(CALL["arguments"])},
                        }
                    ],
                },
                {"role": "tool", "content": '{"temp": 18}'},
                {"role": "assistant", "content": [{"type": "text", "value": "18 degrees."}]},
            ],
            "tools": TOOLS,
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "A draft answer.", "loss_weight": 0},
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": "The final answer.", "loss_weight": 1},
            ]
        },
    ],
    "xtuner": [
        {
            "conversation": [
                {"system": "Answer briefly.", "input": "What is 2+2?", "output": "It is 4."},
                {"input": "And 3+3?", "output": "It is 6."},
            ]
        }
    ],
}


def strings(value):
    """Every text leaf of a record, JSON text (tools, call arguments) read as the structure it holds."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict | list):
            yield from strings(parsed)
        elif value.strip():
            yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in STRUCTURAL:
                yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def part_text(content) -> str:
    if isinstance(content, list):
        return "\n\n".join(p.get("text", p.get("value")) for p in content)
    return content


def assistant_texts(fmt: str, record: dict) -> list:
    """The answers the file asks to train, in order: a text, or a function call as a dict."""
    if fmt == "alpaca":
        return [pair[1] for pair in record.get("history", [])] + [record["output"]]
    if fmt == "xtuner":
        return [turn["output"] for turn in record["conversation"]]
    if fmt == "sharegpt":
        turns = [t for t in record["conversations"] if t["from"] in ("gpt", "function_call")]
        return [
            json.loads(t["value"]) if t["from"] == "function_call" else t["value"]
            for t in turns
            if t.get("loss_weight", 1) != 0
        ]
    turns = [m for m in record["messages"] if m["role"] == "assistant" and m.get("loss_weight", 1) != 0]
    return [
        {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
        for m in turns
        for c in m.get("tool_calls", [])
    ] + [part_text(m["content"]) for m in turns if m["content"]]


def trained_spans(example: dict, tokenizer) -> list[str]:
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return [tokenizer.decode(s) for s in spans + [current] * bool(current)]


def as_answer(span: str):
    """A trained span without its end-of-turn token; a function call (JSON text) as its dict."""
    text = span.removesuffix("<|im_end|>")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@pytest.mark.parametrize(
    "fmt,dataset",
    [
        ("alpaca", "alpaca"),
        ("alpaca", "custom"),
        ("sharegpt", "custom"),
        ("openai", "custom"),
        ("xtuner", "custom"),
    ],
)
def test_every_text_of_the_file_is_seen_and_every_answer_trained(fmt, dataset, tokenizer, tmp_path):
    path = tmp_path / f"{fmt}.json"
    path.write_text(json.dumps(RECORDS[fmt]))
    d = make_cfg([*TINY, f"dataset={dataset}", f"dataset.path={path}", "dataset.max_seq_length=4096"]).dataset
    _, rows = load_conversations(str(path), d, str(tmp_path), "dataset.path")
    for record, row in zip(RECORDS[fmt], rows, strict=True):
        example = tokenize_example(row, tokenizer, d)
        assert not example["truncated"]
        seen = tokenizer.decode(example["input_ids"])
        missing = [s for s in strings(record) if s not in seen]
        assert not missing, f"{fmt}: text of the file the model never sees: {missing}"
        assert [as_answer(s) for s in trained_spans(example, tokenizer)] == assistant_texts(fmt, record)


def test_truncation_accounts_for_every_answer_left_out(tokenizer, tmp_path):
    """Trained spans + the answers truncation reports cut = the file's answers."""
    record = {
        "conversation": [{"input": f"Question {i}?", "output": f"Answer number {i}."} for i in range(4)]
    }
    path = tmp_path / "long.json"
    path.write_text(json.dumps([record]))
    for limit in (40, 60, 4096):
        d = make_cfg(
            [*TINY, "dataset=custom", f"dataset.path={path}", f"dataset.max_seq_length={limit}"]
        ).dataset
        _, rows = load_conversations(str(path), d, str(tmp_path), "dataset.path")
        example = tokenize_example(rows[0], tokenizer, d)
        spans = [as_answer(s) for s in trained_spans(example, tokenizer)]
        answers = assistant_texts("xtuner", record)
        whole = len(spans) - example["shortened"]  # answers trained whole
        assert spans[:whole] == answers[:whole]
        assert whole + example["shortened"] + example["turns_cut"] == len(answers)
        if example["shortened"]:
            assert answers[whole].startswith(spans[-1])


def test_truncation_warning_names_a_shortened_answer_and_detection_is_told_once(tokenizer, tmp_path, caplog):
    import logging

    from qlora_lab.data import tokenize_split

    path = tmp_path / "one_turn.json"
    path.write_text(json.dumps([{"instruction": "Tell a story.", "output": "Once upon a time " * 40}] * 2))
    d = make_cfg([*TINY, "dataset=custom", f"dataset.path={path}", "dataset.max_seq_length=60"]).dataset
    with caplog.at_level(logging.INFO, logger="qlora_lab.data"):
        load_conversations(str(path), d, str(tmp_path), "dataset.path")
        _, rows = load_conversations(
            str(path), d, str(tmp_path), "dataset.path"
        )  # as preflight, then the stage
        _, stats = tokenize_split(rows, tokenizer, d, "train")
    assert sum("is alpaca" in r.getMessage() for r in caplog.records) == 1
    warning = next(r.getMessage() for r in caplog.records if "truncated" in r.getMessage())
    assert "2 answers cut short at the limit, 0 later assistant turns left out, 0 examples dropped" in warning
    assert stats["data/train_shortened"] == 2 and stats["data/train_turns_cut"] == 0
