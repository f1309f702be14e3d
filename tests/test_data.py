"""Prompt formatting, label masking, truncation and subsets on real rows of every shipped dataset."""

from __future__ import annotations

import json

import pytest

from qlora_lab.config import ConfigError
from qlora_lab.data import IGNORE_INDEX, load_splits, render_prompt, tokenize_example, tokenize_split

from .conftest import make_cfg


@pytest.mark.parametrize("dataset", ["alpaca", "alpaca_zh", "gsm8k"])
@pytest.mark.parametrize("template", ["chat", "plain"])
def test_labels_cover_the_response_only(tokenizer, dataset, template):
    cfg = make_cfg(
        [f"dataset={dataset}", f"dataset.template={template}", "dataset.size=20", "dataset.eval_size=5"]
    )
    rows = load_splits(cfg).train
    for row in rows[:5]:
        ex = tokenize_example(row, tokenizer, cfg.dataset)
        ids, labels = ex["input_ids"], ex["labels"]
        if ex["truncated"]:
            continue
        n_prompt = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        prompt_text = tokenizer.decode(ids[:n_prompt])
        user, answer = row["messages"][-2:]
        # the prompt carries the instruction (and input), the labels exactly the response + EOS
        assert user["role"] == "user" and answer["role"] == "assistant"
        assert user["content"][:20] in prompt_text
        assert all(t == IGNORE_INDEX for t in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[n_prompt:-1]) == answer["content"]
        if template == "chat":
            assert prompt_text.endswith("<|im_start|>assistant\n")
        else:
            assert prompt_text.startswith("### Instruction:\n") and prompt_text.endswith("### Answer:\n")


def test_plain_rendering(tokenizer):
    cfg = make_cfg(["dataset.template=plain"])
    text = render_prompt([{"role": "user", "content": "Say hi."}], tokenizer, cfg.dataset)
    assert text == "### Instruction:\nSay hi.\n\n### Answer:\n"
    text = render_prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add."},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Again."},
        ],
        tokenizer,
        cfg.dataset,
    )
    assert text == (
        "Be brief.\n\n### Instruction:\nAdd.\n\n### Answer:\n5<|im_end|>\n\n### Instruction:\nAgain.\n\n"
        "### Answer:\n"
    )


def test_train_on_prompt_keeps_prompt_labels(tokenizer):
    cfg = make_cfg(["dataset.train_on_prompt=true"])
    row = {
        "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        "tools": None,
    }
    ex = tokenize_example(row, tokenizer, cfg.dataset)
    assert ex["labels"] == ex["input_ids"]


def test_truncation_is_counted_and_fully_cut_responses_dropped(tokenizer):
    cfg = make_cfg(["dataset=gsm8k", "dataset.size=30", "dataset.eval_size=5", "dataset.max_seq_length=120"])
    splits = load_splits(cfg)
    ds, stats = tokenize_split(splits.train, tokenizer, cfg.dataset, "train")
    assert stats["data/train_truncated"] > 0
    assert all(len(x) <= 120 for x in ds["input_ids"])
    assert stats["data/train_examples"] == 30 - stats["data/train_dropped"]
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in ds["labels"])


def test_subsets_are_prefixes_and_eval_does_not_depend_on_size():
    small, large = (load_splits(make_cfg([f"dataset.size={n}"])) for n in (16, 64))
    assert len(small.train) == 16 and len(large.train) == 64
    assert small.train == large.train[:16]
    assert small.eval == large.eval
    assert not {str(r) for r in small.eval} & {str(r) for r in large.train}
    reseeded = load_splits(make_cfg(["dataset.size=16", "dataset.seed=7"]))
    assert reseeded.train != small.train


def test_gsm8k_evaluates_on_the_test_split():
    splits = load_splits(make_cfg(["dataset=gsm8k", "dataset.size=10", "dataset.eval_size=7"]))
    assert len(splits.eval) == 7 and splits.files[1].name == "test.jsonl"
    assert "####" in splits.train[0]["messages"][-1]["content"]


@pytest.mark.parametrize(
    "suffix,writer",
    [
        (".jsonl", lambda rows: "\n".join(json.dumps(r) for r in rows)),
        (".csv", lambda rows: "q,a\n" + "\n".join(f"{r['q']},{r['a']}" for r in rows)),
    ],
)
def test_generic_column_mapping(tmp_path, suffix, writer):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(12)]
    path = tmp_path / f"data{suffix}"
    path.write_text(writer(rows))
    cfg = make_cfg(
        [
            "dataset=custom",
            f"dataset.path={path}",
            "dataset.columns.instruction=q",
            "dataset.columns.output=a",
            "dataset.eval_size=2",
        ]
    )
    splits = load_splits(cfg)
    assert len(splits.train) == 10 and len(splits.eval) == 2
    assert all(
        r["messages"][0] == {"role": "user", "content": r["messages"][0]["content"]} for r in splits.train
    )
    assert all(r["messages"][0]["content"].startswith("question") for r in splits.train)
    assert all(r["messages"][1]["content"].startswith("answer") for r in splits.train)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_is_read_past(tmp_path, suffix):
    """Windows editors start UTF-8 files with a BOM; a JSON list (or JSON Lines) so saved reads as without
    one."""
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(12)]
    text = json.dumps(rows, indent=1) if suffix == ".json" else "\n".join(json.dumps(r) for r in rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    splits = load_splits(make_cfg([f"dataset.path={path}", "dataset.eval_size=2"]))
    assert sorted(r["messages"][0]["content"] for r in splits.train + splits.eval) == sorted(
        r["instruction"] for r in rows
    )


@pytest.mark.parametrize(
    "content,message",
    [
        ("[]", "holds no records"),
        ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]', "record 1"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "", "output": "d"}]', "record 1"),
        ('[{"prompt": "a", "output": "b"}]', "dataset.columns.instruction"),
    ],
)
def test_bad_records_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_splits(make_cfg([f"dataset.path={path}", "dataset.eval_size=1"]))


def test_missing_file_and_too_large_size_are_named(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path=.*nope.json: no such file"):
        load_splits(make_cfg([f"dataset.path={tmp_path}/nope.json"]))
    with pytest.raises(ConfigError, match="dataset.size=5000"):
        load_splits(make_cfg(["dataset.size=5000"]))
