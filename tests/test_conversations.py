"""Conversation data: every format to the canonical row, labels under three chat-template families, truncation
by whole turns, prompts and references for generation, and each format through the real command line."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from datasets import Dataset

from qlora_lab.data import (
    IGNORE_INDEX,
    end_of_turn_id,
    load_splits,
    prompt_and_reference,
    render,
    to_conversations,
    tokenize_example,
)
from qlora_lab.inference import hf_generation_config

from .conftest import ROOT, TINY, make_cfg, run_main

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# One record of each format, as README "Your data" shows them, and the conversation each must become
RECORDS = {
    "alpaca": {
        "system": "Answer briefly.",
        "history": [["What is 2+2?", "4"]],
        "instruction": "And 3+3?",
        "input": "",
        "output": "6",
    },
    "xtuner": {
        "conversation": [
            {"system": "Answer briefly.", "input": "What is 2+2?", "output": "4"},
            {"input": "And 3+3?", "output": "6"},
        ]
    },
    "openai": {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'},
            {"role": "assistant", "content": "18 degrees."},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
    },
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 18}'},
            {"from": "gpt", "value": "18 degrees."},
        ],
        "system": "Answer briefly.",
        "tools": json.dumps([WEATHER]),
    },
}
ARITHMETIC = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
TOOL_CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 18}'},
    {"role": "assistant", "content": "18 degrees."},
]
EXPECTED = {
    "alpaca": (ARITHMETIC, None),
    "xtuner": (ARITHMETIC, None),
    "openai": (
        [
            *TOOL_CHAT[:2],
            {**TOOL_CHAT[2], "tool_calls": [CALL | {"id": "c1"}]},
            {**TOOL_CHAT[3], "tool_call_id": "c1"},
            TOOL_CHAT[4],
        ],
        [{"type": "function", "function": WEATHER}],
    ),
    "sharegpt": (TOOL_CHAT, [WEATHER]),
}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_becomes_the_canonical_row(fmt, caplog):
    d = make_cfg(["dataset=custom", "dataset.path=x"]).dataset  # dataset.format=auto
    with caplog.at_level(logging.INFO, logger="qlora_lab.data"):
        (row,) = to_conversations([RECORDS[fmt]], d, "file.json")
    assert (row["messages"], row["tools"]) == EXPECTED[fmt]
    assert f"file.json is {fmt}" in caplog.text  # auto detection says what it found


def test_sharegpt_tools_may_be_a_list_and_columns_are_configurable():
    record = {"chat": RECORDS["sharegpt"]["conversations"], "functions": [WEATHER], "sys": "Answer briefly."}
    d = make_cfg(
        [
            "dataset=custom",
            "dataset.path=x",
            "dataset.format=sharegpt",
            "dataset.columns.messages=chat",
            "dataset.columns.tools=functions",
            "dataset.columns.system=sys",
        ]
    ).dataset
    (row,) = to_conversations([record], d, "file.json")
    assert (row["messages"], row["tools"]) == EXPECTED["sharegpt"]
    # a 'conversations' list of {role, content} is openai, whatever its name
    record = {"conversations": RECORDS["openai"]["messages"], "tools": RECORDS["openai"]["tools"]}
    (row,) = to_conversations([record], make_cfg(["dataset=custom", "dataset.path=x"]).dataset, "file.json")
    assert (row["messages"], row["tools"]) == EXPECTED["openai"]


# ---------------------------------------------------------------- labels under three template families

LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
    "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def with_template(tokenizer, template: str, bos: str, eos: str, extra: list[str]):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": extra})
    tok.chat_template = template
    return tok


def marked(example: dict, tok) -> str:
    """Token by token, a trained position in [brackets] (its label is its own id), a masked one bare."""
    out = []
    for token_id, label in zip(example["input_ids"], example["labels"], strict=True):
        assert label in (IGNORE_INDEX, token_id)
        token = tok.convert_ids_to_tokens(token_id)
        out.append(f"[{token}]" if label == token_id else token)
    return " ".join(out)


CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ],
    "tools": None,
}
# What the template renders between turns is context (masked); the end-of-turn token is trained, and the
# sequence ends with it. The text before an answer is tokenized as at generation time, where the prompt ends
# there: Llama-3's "\n\n" is one token (ĊĊ) before an answer, as in a generation prompt, two inside a prompt.
MASKS = {
    "chatml (SmolLM2: end of turn = EOS, then a newline)": (
        "<|im_start|> system Ċ Be Ġbrief . <|im_end|> Ċ <|im_start|> user Ċ Hi <|im_end|> Ċ <|im_start|> ass "
        "istant Ċ [Hello] [<|im_end|>] Ċ <|im_start|> user Ċ By e <|im_end|> Ċ <|im_start|> ass istant Ċ "
        "[See] [Ġyou] [<|im_end|>]"
    ),
    "llama3 (<|eot_id|> = EOS, BOS from the template)": (
        "<|begin_of_text|> <|start_header_id|> system <|end_header_id|> Ċ Ċ Be Ġbrief . <|eot_id|> "
        "<|start_header_id|> user <|end_header_id|> Ċ Ċ Hi <|eot_id|> <|start_header_id|> ass istant "
        "<|end_header_id|> "
        "ĊĊ [Hello] [<|eot_id|>] <|start_header_id|> user <|end_header_id|> Ċ Ċ By e <|eot_id|> "
        "<|start_header_id|> ass istant <|end_header_id|> ĊĊ [See] [Ġyou] [<|eot_id|>]"
    ),
    "gemma (<end_of_turn>, not EOS)": (
        "<bos> <start_of_turn> system Ċ Be Ġbrief . <end_of_turn> Ċ <start_of_turn> user Ċ Hi <end_of_turn> "
        "Ċ <start_of_turn> model Ċ [Hello] [<end_of_turn>] Ċ <start_of_turn> user Ċ By e <end_of_turn> Ċ "
        "<start_of_turn> model Ċ [See] [Ġyou] [<end_of_turn>]"
    ),
}


def family(tokenizer, name: str):
    if name.startswith("llama3"):
        return with_template(
            tokenizer, LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]
        )
    if name.startswith("gemma"):
        return with_template(tokenizer, GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"])
    return tokenizer


@pytest.mark.parametrize("name", list(MASKS))
def test_every_assistant_turn_is_trained_through_its_end_of_turn_token(tokenizer, name):
    tok = family(tokenizer, name)
    example = tokenize_example(CONVERSATION, tok, make_cfg().dataset)
    assert marked(example, tok) == MASKS[name]
    # generation stops at the token the template ends a turn with, also where that is not EOS
    eot = end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == MASKS[name].rsplit("[", 1)[1][:-1]
    stop = hf_generation_config(make_cfg().generation, tok).eos_token_id
    assert stop == (tok.eos_token_id if eot == tok.eos_token_id else [tok.eos_token_id, eot])


def test_train_on_last_assistant_masks_the_earlier_answers(tokenizer):
    example = tokenize_example(CONVERSATION, tokenizer, make_cfg(["dataset.train_on=last_assistant"]).dataset)
    trained = [t for t in marked(example, tokenizer).split() if t.startswith("[")]
    assert trained == ["[See]", "[Ġyou]", "[<|im_end|>]"]


def test_a_template_with_no_end_of_turn_token_gets_eos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    example = tokenize_example(CONVERSATION, tok, make_cfg().dataset)
    trained = [t for t in marked(example, tok).split() if t.startswith("[")]
    assert trained == [
        "[Hello]",
        "[<|im_end|>]",
        "[See]",
        "[Ġyou]",
        "[<|im_end|>]",
    ]  # EOS: generation can stop


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_go_to_a_template_that_renders_them_else_into_the_system_turn(tokenizer):
    row = {"messages": TOOL_CHAT, "tools": [WEATHER]}
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    d = make_cfg().dataset
    text = render(row["messages"], row["tools"], tok, "chat")
    assert text.startswith('<|im_start|>system\nTools: [{"name": "get_weather"')
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": '
        '"Paris"}}</tool_call>' in text
    )
    trained = tok.decode([t for t in tokenize_example(row, tok, d)["labels"] if t != IGNORE_INDEX])
    assert trained == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
        "18 degrees.<|im_end|>"
    )

    # SmolLM2's template renders neither tools nor calls: the documented plain rendering of both
    text = render(row["messages"], row["tools"], tokenizer, "chat")
    assert text.startswith(
        "<|im_start|>system\nAnswer briefly.\n\nYou can call these functions; to call one, answer "
        'with a JSON object {"name": ..., "arguments": {...}}:\n{"name": "get_weather"'
    )
    assert '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Paris"}}<|im_end|>' in text
    assert '<|im_start|>tool\n{"temp": 18}<|im_end|>' in text


# ---------------------------------------------------------------- Alpaca rows: the same tokens as before


def alpaca_tokens_before(record: dict, tokenizer, system_prompt: str | None) -> list[int]:
    """data.tokenize_example as it was before conversations (commit c2dd1b9): chat template prompt + output +
    EOS."""
    user = (
        record["instruction"] if not record.get("input") else f"{record['instruction']}\n\n{record['input']}"
    )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        + tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
    )


@pytest.mark.parametrize(
    "overrides", [["dataset=alpaca", "dataset.system_prompt=Be brief."], ["dataset=alpaca_zh"]]
)
def test_alpaca_rows_give_the_same_tokens_and_split_as_before(tokenizer, overrides):
    cfg = make_cfg([*overrides, "dataset.max_seq_length=4096"])
    records = json.loads((ROOT / "data" / f"{cfg.dataset.name}.json").read_text())
    before = (
        Dataset.from_list(records).shuffle(seed=cfg.dataset.seed).to_list()
    )  # the split as datasets drew it
    splits = load_splits(cfg)
    rows = splits.eval + splits.train
    assert len(rows) == len(before)
    for row, record in zip(rows, before, strict=True):
        example = tokenize_example(row, tokenizer, cfg.dataset)
        assert example["input_ids"] == alpaca_tokens_before(record, tokenizer, cfg.dataset.system_prompt)


# ---------------------------------------------------------------- truncation, prompts and references


def test_truncation_keeps_whole_turns_from_the_start(tokenizer):
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        turns += [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    row = {"messages": turns, "tools": None}
    whole = tokenize_example(row, tokenizer, make_cfg(["dataset.max_seq_length=4096"]).dataset)
    two_turns = len(
        tokenize_example(
            {"messages": turns[:5], "tools": None},
            tokenizer,
            make_cfg(["dataset.max_seq_length=4096"]).dataset,
        )["input_ids"]
    )
    cut = tokenize_example(row, tokenizer, make_cfg([f"dataset.max_seq_length={two_turns + 3}"]).dataset)
    assert (
        cut["input_ids"] == whole["input_ids"][:two_turns]
        and cut["truncated"]
        and cut["turns_cut"] == 1
        and not cut["shortened"]
    )
    assert tokenizer.decode(cut["input_ids"]).endswith("Answer 1.<|im_end|>")
    # when even the first turn does not fit, it is cut at the limit (its answer partly trained), as single
    # turns are
    first_turn = len(
        tokenize_example(
            {"messages": turns[:3], "tools": None},
            tokenizer,
            make_cfg(["dataset.max_seq_length=4096"]).dataset,
        )["input_ids"]
    )
    first = tokenize_example(row, tokenizer, make_cfg([f"dataset.max_seq_length={first_turn - 2}"]).dataset)
    assert (
        first["input_ids"] == whole["input_ids"][: first_turn - 2]
        and first["turns_cut"] == 2
        and first["shortened"]
    )
    assert first["labels"][-2:] == first["input_ids"][-2:] and first["trainable"]


def test_prompt_is_the_conversation_up_to_its_last_answer(tokenizer):
    d = make_cfg().dataset
    task = prompt_and_reference({"messages": ARITHMETIC, "tools": None}, tokenizer, d)
    assert task["prompt"].endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert "2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>" in task["prompt"]
    assert task["reference"] == "6" and task["message"] == "And 3+3?"
    call = prompt_and_reference({"messages": TOOL_CHAT[:3], "tools": [WEATHER]}, tokenizer, d)
    assert call["reference"] == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert "get_weather" in call["prompt"] and call["prompt"].endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- each format through the command line


def write_format_files(folder) -> dict[str, str]:
    """12 records of each format (numbers varied), as JSON or JSON Lines."""
    paths = {}
    for fmt, record in RECORDS.items():
        rows = [
            json.loads(json.dumps(record).replace("Paris", f"Paris {i}").replace("2+2", f"{i}+{i}"))
            for i in range(12)
        ]
        path = folder / (f"{fmt}.jsonl" if fmt in ("openai", "xtuner") else f"{fmt}.json")
        path.write_text(
            "\n".join(json.dumps(r) for r in rows) if path.suffix == ".jsonl" else json.dumps(rows)
        )
        paths[fmt] = str(path)
    return paths


def test_every_format_trains_and_evaluates_through_the_cli(tmp_path):
    paths = write_format_files(tmp_path)
    sweep = tmp_path / "sweep"
    # one multirun, in this process: each format is one job
    result = run_main(
        "-m",
        *TINY,
        "dataset=custom",
        f"dataset.path={','.join(paths.values())}",
        "dataset.size=8",
        "dataset.eval_size=4",
        "dataset.max_seq_length=256",
        "train.max_steps=2",
        "train.eval_before=false",
        "pipeline.stages=[train,evaluate]",
        "eval.modes=[adapter]",
        "eval.metrics=[perplexity,rouge]",
        "eval.max_samples=2",
        "generation.max_new_tokens=3",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [sweep / str(n) for n in range(len(paths))]
    assert len(jobs) == len(paths)
    for job, (fmt, path) in zip(jobs, paths.items(), strict=True):
        assert path in (job / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((job / "run.json").read_text())["status"] == "completed", fmt
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["data/train_examples"] == 8 and metrics["eval/perplexity"] > 1, fmt
        assert f"is {fmt}" in (job / "__main__.log").read_text()  # what auto detection found
        generations = [json.loads(line) for line in (job / "eval_generations.jsonl").read_text().splitlines()]
        last_answer = {"alpaca": "6", "xtuner": "6"}.get(fmt, "18 degrees.")
        assert [g["reference"] for g in generations] == [last_answer] * 2
        assert all(g["prompt"].endswith("<|im_start|>assistant\n") for g in generations)
