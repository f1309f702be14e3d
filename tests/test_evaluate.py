"""The evaluate stage on a tiny_random run: before/after table, metrics keys, GSM8K accuracy, bad input."""

from __future__ import annotations

import copy
import csv
import json
import math
from unittest import mock

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from qlora_lab.config import InferenceMode
from qlora_lab.inference import load_for_inference
from qlora_lab.pipelines import evaluate, train
from qlora_lab.rundir import Run

from .conftest import TINY, make_cfg, run_main


@pytest.fixture(scope="module")
def trained_gsm8k(tmp_path_factory):
    """A tiny run trained on GSM8K (quantization none: fast and exact)."""
    run_dir = tmp_path_factory.mktemp("train")
    cfg = make_cfg(
        [
            *TINY,
            "dataset=gsm8k",
            "dataset.max_seq_length=160",
            "quantization=none",
            "dataset.eval_size=6",
            "train.max_steps=12",
        ]
    )
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as Hydra does for a CLI run
    run = Run(dir=run_dir, source=run_dir)
    run.start(cfg)
    train.run(cfg, run)
    run.finish()
    return cfg, run_dir


def test_before_after_table_and_metric_keys(trained_gsm8k, tmp_path):
    cfg, run_dir = trained_gsm8k
    cfg.eval.max_samples = 4
    cfg.generation.max_new_tokens = 8
    run = Run(dir=tmp_path, source=run_dir)
    run.start(cfg)
    results = evaluate.run(cfg, run)

    assert list(results) == ["base", "adapter"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("perplexity", "rouge1", "rouge2", "rougeL", "bleu4", "accuracy", "accuracy_lenient"):
        assert f"eval/{key}" in metrics and f"eval_base/{key}" in metrics, key
    # where the time went, and how many tokens the 4 answers of at most 8 tokens took
    assert metrics["eval/perplexity_s"] > 0 and metrics["eval/generation_s"] > 0
    assert 4 <= metrics["eval/generated_tokens"] <= 4 * 8
    # fine-tuning lowered the eval perplexity; the training run's own eval loss agrees with it
    train_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval/perplexity"] < metrics["eval_base/perplexity"]
    assert math.log(metrics["eval/perplexity"]) == pytest.approx(train_metrics["eval/loss"], rel=0.05)
    assert math.log(metrics["eval_base/perplexity"]) == pytest.approx(
        train_metrics["eval/loss_before"], rel=0.05
    )

    rows = list(csv.reader(open(tmp_path / "evaluation.csv")))
    assert rows[0] == ["metric", "base", "adapter", "change"]
    ppl = next(r for r in rows if r[0] == "perplexity")
    assert float(ppl[3]) == pytest.approx(float(ppl[2]) - float(ppl[1]), abs=0.02)
    assert "| perplexity |" in (tmp_path / "evaluation.md").read_text()
    generations = [json.loads(line) for line in open(tmp_path / "eval_generations.jsonl")]
    assert len(generations) == 8 and {g["mode"] for g in generations} == {"base", "adapter"}
    assert all("####" in g["reference"] for g in generations)


def test_base_model_alone_needs_no_run(tmp_path):
    cfg = make_cfg(
        [*TINY, "quantization=none", "eval.modes=[base]", "inference=base", "eval.metrics=[perplexity]"]
    )
    run = Run(dir=tmp_path, source=tmp_path)
    run.start(cfg)
    results = evaluate.run(cfg, run)
    assert list(results) == ["base"] and results["base"]["perplexity"] > 1
    assert "eval/perplexity" in json.loads((tmp_path / "metrics.json").read_text())


def test_unknown_metric_is_refused_at_compose_time():
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg([*TINY, "eval.metrics=[perplexity,meteor]"])
    assert "'meteor', expected one of [perplexity, rouge, bleu, accuracy]" in str(e.value.__cause__)


def test_cli_evaluate_on_a_run_dir(trained_gsm8k, tmp_path):
    _, run_dir = trained_gsm8k
    result = run_main(
        "pipeline=evaluate",
        f"run_dir={run_dir}",
        "eval.max_samples=2",
        "eval.metrics=[perplexity,rouge]",
        "generation.max_new_tokens=4",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| perplexity |" in result.stdout and "ROUGE-1" in result.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["eval/perplexity"] < metrics["eval_base/perplexity"]


def test_one_generation_batch_same_answers_fewer_decode_steps(trained_gsm8k, tmp_path, monkeypatch):
    """eval.generation_batch_size: the 6 prompts in one generate() call (under inference_mode) instead of
    batches of eval.batch_size (under no_grad, as before). The greedy answers are the same; the model
    runs one forward per generated position of the longest answer (prefill included) instead of one per
    batch; each answer is turned into text once, after generation (no per-step decoding of the
    sequences)."""
    cfg, run_dir = trained_gsm8k
    cfg = copy.deepcopy(cfg)
    cfg.eval.modes, cfg.eval.metrics = ["adapter"], ["accuracy"]
    cfg.eval.max_samples, cfg.eval.batch_size, cfg.generation.max_new_tokens = 6, 2, 8
    calls = {}

    def counted(cfg, source, mode):
        model, tokenizer = load_for_inference(cfg, source, mode)
        model.get_base_model().register_forward_hook(lambda *_: calls.update(forward=calls["forward"] + 1))
        for name in ("decode", "batch_decode"):
            original = getattr(tokenizer, name)

            def counted_decode(*args, _name=name, _original=original, **kwargs):
                calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(tokenizer, name, counted_decode)
        return model, tokenizer

    monkeypatch.setattr(evaluate, "load_for_inference", counted)
    answers = {}
    # generation as it was (batches of eval.batch_size, under no_grad), then in one batch under inference_mode
    for generation_batch, context in ((None, torch.no_grad), (6, torch.inference_mode)):
        calls.update(forward=0, decode=0, batch_decode=0)
        cfg.eval.generation_batch_size = generation_batch
        folder = tmp_path / str(generation_batch)
        folder.mkdir()
        run = Run(dir=folder, source=run_dir)
        run.start(cfg)
        with mock.patch.object(torch, "inference_mode", context):
            _, generations = evaluate.evaluate_mode(cfg, run, InferenceMode.adapter, list(cfg.eval.metrics))
        lengths = [g["new_tokens"] for g in generations]
        answers[generation_batch] = [g["output"] for g in generations]
        batches = [lengths[i : i + (generation_batch or 2)] for i in range(0, 6, generation_batch or 2)]
        assert calls["forward"] == sum(max(b) for b in batches), (generation_batch, lengths)
        assert calls["decode"] == 6 and calls["batch_decode"] == 0
    assert answers[6] == answers[None]
    assert max(len(a) for a in answers[6]) > 0
