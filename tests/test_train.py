"""Training on the tiny random model in every quantization mode: the loss falls and the adapter reloads
exactly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel

from qlora_lab.data import load_splits, tokenize_split
from qlora_lab.models import OncePerMessage, load_model, load_tokenizer, model_path, tokenizer_path
from qlora_lab.pipelines import train
from qlora_lab.rundir import Run

from .conftest import TINY, make_cfg


@pytest.mark.parametrize("quant", ["none", "nf4", "fp4", "int8"])
def test_tiny_training_learns_and_adapter_reloads(tmp_path, quant, caplog):
    cfg = make_cfg([*TINY, f"quantization={quant}"])
    # the filter lets each message through once per process: forget what earlier in-process runs of the suite
    # showed
    for f in logging.getLogger("bitsandbytes.autograd._functions").filters:
        if isinstance(f, OncePerMessage):
            f.seen.clear()
    run = Run(dir=tmp_path, source=tmp_path)
    run.start(cfg)
    model = train.run(cfg, run)
    run.finish()
    # bitsandbytes' per-matmul int8 warning is shown once, not on every matmul of every step
    assert sum("MatMul8bitLt" in r.getMessage() for r in caplog.records) == (
        quant == "int8" and not torch.cuda.is_available()
    )

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eval/loss"] < metrics["eval/loss_before"] - 0.05, metrics
    assert metrics["train/loss_last"] < metrics["train/loss_first"]
    assert 0 < metrics["params/trainable"] < metrics["params/total"]
    for key in ("train/tokens_per_s", "memory/peak_gib", "model/footprint_gib", "time/wall_s"):
        assert metrics[key] > 0, key
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "completed" and len(info["dataset"]["sha256"]) == 64
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    # The saved adapter on a freshly loaded (and freshly quantized) base reproduces the trained model's
    # logits.
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    batch = tokenize_split(load_splits(cfg).eval[:2], tokenizer, cfg.dataset, "eval")[0]
    ids = torch.tensor([batch["input_ids"][0]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_model(model_path(cfg), cfg), adapter).eval()
        again = reloaded(input_ids=ids).logits
    torch.testing.assert_close(again, trained, rtol=1e-4, atol=1e-4)
    base_logits = load_model(model_path(cfg), cfg)(input_ids=ids).logits
    assert (base_logits - trained).abs().max() > 1e-3  # the adapter really changed the model


def test_4bit_layers_stay_trainable_after_an_eval_forward():
    """On AVX512-BF16 CPUs bitsandbytes would switch a 4-bit layer to a bf16 inference layout at its first
    eval forward and keep it for training, with no gradient through the layer
    (models.keep_one_cpu_4bit_path)."""
    from qlora_lab.models import attach_lora

    cfg = make_cfg([*TINY, "quantization=nf4"])
    model = attach_lora(load_model(model_path(cfg), cfg), cfg)
    ids = torch.randint(0, 1000, (1, 16))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    base = model.get_base_model().model.layers[0].self_attn.q_proj
    assert not getattr(base.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    # layer 0's adapter gets a gradient only through the 4-bit layers above it (B: A starts with none, as B =
    # 0)
    assert base.lora_B["default"].weight.grad.abs().sum() > 0


def test_memory_cap_finds_the_largest_batch_under_it_from_the_same_start(tmp_path, monkeypatch):
    """train.memory_cap_gib with batch_size=auto: a step over the cap counts as out of memory and the batch
    search shrinks the batch (0.9x). The peaks are faked as a function of the batch (on a CPU the process's
    RSS says little about a batch), so the outcome is exact: 0.5 + 0.05·batch GiB under a 1.0 GiB cap fits
    batch 10."""
    seen, losses_at_start = {}, []
    begin, evaluate = train.MemoryCap.on_train_begin, train.EvalCurve.on_evaluate

    def on_train_begin(self, args, state, control, **kwargs):
        seen["batch"] = state.train_batch_size
        return begin(self, args, state, control, **kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == 0:
            losses_at_start.append(metrics["eval_loss"])
        return evaluate(self, args, state, control, metrics=metrics, **kwargs)

    monkeypatch.setattr(train.MemoryCap, "on_train_begin", on_train_begin)
    monkeypatch.setattr(train.EvalCurve, "on_evaluate", on_evaluate)
    monkeypatch.setattr(train, "peak_memory_gib", lambda: 0.5 + 0.05 * seen["batch"])
    monkeypatch.setattr(train, "reset_peak_memory", lambda: None)
    cfg = make_cfg(
        [
            *TINY,
            "quantization=nf4",
            "train.batch_size=auto",
            "train.auto_batch_start=16",
            "train.memory_cap_gib=1.0",
            "train.max_steps=2",
        ]
    )
    run = Run(dir=tmp_path, source=tmp_path)
    run.start(cfg)
    train.run(cfg, run)
    run.finish()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train/batch_size"] == 10 and metrics["train/memory_cap_gib"] == 1.0
    assert metrics["train/batch_over_cap"] == [
        {"batch": 16, "peak_gib": 1.3},
        {"batch": 14, "peak_gib": 1.2},
        {"batch": 12, "peak_gib": 1.1},
    ]
    # each attempt began from the untrained adapter, though the ones over the cap had taken a step
    assert len(losses_at_start) == 4 and len(set(losses_at_start)) == 1


def test_memory_cap_that_no_batch_fits_says_so(tmp_path, monkeypatch):
    from qlora_lab.config import ConfigError

    monkeypatch.setattr(train, "peak_memory_gib", lambda: 2.5)
    monkeypatch.setattr(train, "reset_peak_memory", lambda: None)
    cfg = make_cfg([*TINY, "train.batch_size=auto", "train.auto_batch_start=2", "train.memory_cap_gib=0.5"])
    run = Run(dir=tmp_path, source=tmp_path)
    run.start(cfg)
    with pytest.raises(
        ConfigError,
        match=r"^no batch fits under train.memory_cap_gib=0.5: batch 1 peaked at 2.500 "
        r"GiB; raise the cap \(or shorten dataset.max_seq_length\).$",
    ):
        train.run(cfg, run)
