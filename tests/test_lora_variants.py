"""lora.variant, lora.rslora and lora.init (issue 25) on the tiny random model: each composes, trains and
reloads; LoftQ starts closer to the full-precision model; every later stage takes their adapters. All
in-process."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel

from qlora_lab.data import load_splits, tokenize_split
from qlora_lab.fused_lora import lora_unfused_reason
from qlora_lab.models import attach_lora, load_model, load_tokenizer, model_path, tokenizer_path
from qlora_lab.pipelines import evaluate, export, infer, merge, train
from qlora_lab.rundir import Run
from qlora_lab.validation import validate

from .conftest import TINY, make_cfg

FAST = [
    "train.max_steps=2",
    "train.eval_before=false",
    "generation.max_new_tokens=4",
    "inference.num_prompts=2",
    "inference.batch_size=2",
    "inference.agreement_examples=2",
]
OPTIONS = {
    "dora": ["quantization=nf4", "lora.variant=dora"],
    "rslora": ["quantization=nf4", "lora.rslora=true", "lora.r=32"],
    "gaussian": ["quantization=nf4", "lora.init=gaussian"],
    "loftq": ["quantization=nf4", "lora.init=loftq"],
    "pissa": ["quantization=none", "lora.init=pissa"],
}


def trained_run(run_dir, overrides: list[str]):
    """Train in-process into run_dir, saving its config as Hydra does (later stages read it)."""
    cfg = make_cfg([*TINY, *FAST, *overrides])
    validate(cfg)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run = Run(dir=run_dir, source=run_dir)
    run.start(cfg)
    model = train.run(cfg, run)
    run.finish()
    return cfg, model


def first_eval_ids(cfg):
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    batch = tokenize_split(load_splits(cfg).eval[:1], tokenizer, cfg.dataset, "eval")[0]
    return torch.tensor([batch["input_ids"][0]])


@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_trains_and_its_adapter_reloads_with_the_same_logits(tmp_path, option, capsys):
    cfg, model = trained_run(tmp_path, OPTIONS[option])
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] == (option == "dora") and saved["use_rslora"] == (option == "rslora")
    # PiSSA is saved converted: a plain LoRA of rank 2r over the original weights, so the base loads as usual
    assert saved["r"] == (32 if option in ("pissa", "rslora") else 16)
    assert saved["init_lora_weights"] in (True, "gaussian")
    if option == "rslora":
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(32 / math.sqrt(32))  # alpha / sqrt(r), not alpha / r
    printed = capsys.readouterr().out
    if option == "dora":
        assert "LoRA layers peft (lora.variant=dora, which the fused layers do not cover)" in printed
    if option == "loftq":
        assert "lora.init=loftq: 14 adapted 4-bit layers start from their quantization error" in printed

    ids = first_eval_ids(cfg)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_model(model_path(cfg), cfg), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
        base = load_model(model_path(cfg), cfg)(input_ids=ids).logits
    assert (base - trained).abs().max() > 1e-3  # two steps changed the model


def test_dora_takes_peft_layers_even_where_the_fused_ones_would_run():
    cfg = make_cfg([*TINY, "lora.variant=dora", "train.lora_layers=auto"])
    assert lora_unfused_reason(cfg).startswith("lora.variant=dora")
    assert lora_unfused_reason(make_cfg([*TINY, "lora.rslora=true", "train.lora_layers=fused"])) is None


def test_pissa_is_refused_under_fsdp(monkeypatch):
    from qlora_lab.config import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"^lora\.init=pissa cannot run under FSDP"):
        validate(make_cfg([*TINY, "quantization=none", "lora.init=pissa"]))


def test_loftq_start_halves_the_quantization_error_on_a_fixed_batch():
    """The nf4 model with LoftQ's initial adapter against the full-precision model: the RMS logit error on a
    fixed batch falls from 0.0161 (plain QLoRA, whose adapter starts as a no-op) to 0.0078 (measured,
    r=16)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (2, 32))
    full_cfg = make_cfg([*TINY, "quantization=none"])
    with torch.no_grad():
        reference = load_model(model_path(full_cfg), full_cfg)(input_ids=ids).logits
    error = {}
    for init in ("default", "loftq"):
        cfg = make_cfg([*TINY, "quantization=nf4", f"lora.init={init}"])
        model = attach_lora(load_model(model_path(cfg), cfg), cfg).eval()
        with torch.no_grad():
            error[init] = (model(input_ids=ids).logits - reference).pow(2).mean().sqrt().item()
    assert error["default"] > 1e-3, error  # nf4 does change the model
    assert error["loftq"] < 0.6 * error["default"], error


@pytest.mark.parametrize("option", ["pissa", "loftq", "dora"])
def test_resume_rederives_the_start_and_ends_with_the_same_adapter(tmp_path, option, capsys):
    """A run's last checkpoint and adapter are dropped and the run resumed from the one before: PiSSA's
    residual base and LoftQ's start are computed again, DoRA's magnitudes come back from the checkpoint, and
    the adapter ends as the uninterrupted run's did (CPU fp32)."""
    from safetensors.torch import load_file

    steps = ["train.max_steps=4", "train.save_steps=2"]
    trained_run(tmp_path, [*OPTIONS[option], *steps])
    whole = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")
    shutil.rmtree(tmp_path / "adapter")
    cfg = make_cfg([*TINY, *FAST, *OPTIONS[option], *steps, "train.resume=true"])
    run = Run(dir=tmp_path, source=tmp_path)
    run.start(cfg, resume=True)
    capsys.readouterr()
    train.run(cfg, run)
    run.finish()
    assert "resuming from" in (printed := capsys.readouterr().out) and "checkpoint-2" in printed
    resumed = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=["dora", "pissa"])
def variant_run(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(request.param)
    cfg, _ = trained_run(run_dir, OPTIONS[request.param])
    return request.param, run_dir


def test_every_stage_takes_the_adapter(variant_run, tmp_path):
    """merge (both bases where the run is quantized), infer in every mode, evaluate, export and the web app's
    model loading, on a DoRA QLoRA run and a PiSSA LoRA run."""
    option, run_dir = variant_run
    overrides = [*TINY, *FAST, *OPTIONS[option]]
    quantized = option != "pissa"
    for base in ("original", "dequantized") if quantized else ("original",):
        cfg = make_cfg([*overrides, f"merge.base={base}", "merge.overwrite=true"])
        merge.run(cfg, Run(dir=tmp_path, source=run_dir))
        report = json.loads((run_dir / "merged" / "merge_report.json").read_text())
        assert report["merge/base"] == base
        if base == "dequantized" or not quantized:
            # merged into the weights it was trained against: the model as trained
            assert report["merge/trained_mean_kl"] < 1e-5, report
    for mode in ("adapter", "merge_and_unload", "merged", "base"):
        job = tmp_path / mode
        job.mkdir()
        infer.run(make_cfg([*overrides, f"inference={mode}"]), Run(dir=job, source=run_dir))
        rows = [json.loads(line) for line in (job / "generations.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["mode"] == mode and r["new_tokens"] >= 1 for r in rows)
    cfg = make_cfg([*overrides, "eval.metrics=[perplexity]", "eval.max_samples=2"])
    (tmp_path / "evaluate").mkdir()
    job = Run(dir=tmp_path / "evaluate", source=run_dir)
    job.start(cfg)
    results = evaluate.run(cfg, job)
    assert results["adapter"]["perplexity"] > 1
    (tmp_path / "export").mkdir()
    export.run(
        make_cfg([*overrides, "pipeline=export", "export.targets=[int8_dynamic]", "export.measure=false"]),
        Run(dir=tmp_path / "export", source=run_dir),
    )
    assert (run_dir / "export" / "int8_dynamic").is_dir()
    (tmp_path / "int8_dynamic").mkdir()
    infer.run(
        make_cfg([*overrides, "inference=int8_dynamic"]), Run(dir=tmp_path / "int8_dynamic", source=run_dir)
    )
    assert (tmp_path / "int8_dynamic" / "generations.jsonl").is_file()

    from qlora_lab.pipelines.web import ModelCache

    loaded = ModelCache(make_cfg(overrides), None).get(run_dir, "adapter")
    assert isinstance(loaded.model, PeftModel) and loaded.model.peft_config["default"].use_dora == (
        option == "dora"
    )


def test_sweep_report_has_a_row_per_variant_against_the_lora_job():
    from qlora_lab.report import lora_label, variants

    def label(*overrides):
        return lora_label(make_cfg(["+experiment=qlora_variants", *overrides]))

    assert [
        label(f"+qlora_variant={v}") for v in ("lora", "qlora", "qlora_loftq", "qlora_dora", "qlora_rslora")
    ] == ["LoRA r16", "LoRA r16", "LoRA r16, loftq init", "DoRA r16", "rsLoRA r64"]
    keys = ("trainable_params", "eval_loss_before", "eval_loss", "eval_perplexity", "train_s", "tokens_per_s")
    row = dict.fromkeys(keys, 1.0) | {"dataset_size": 16, "seed": 42}
    done = [
        row | {"quantization": "none", "lora": "LoRA r16", "wall_s": 10.0, "peak_gib": 2.0},
        row | {"quantization": "nf4", "lora": "DoRA r16", "wall_s": 15.0, "peak_gib": 3.0},
    ]
    lines = variants(done)
    assert lines[1] == "## LoRA variants"
    assert lines[-3].endswith(
        "| QLoRA nf4 | DoRA r16 | 1 | 1.0000 | 1.0000 | 1.00 | 15.0 | 1.0 | 1 | 3.00 | 1.50 | 1.50 |"
    )
    assert variants(done[:1]) == [] and variants([done[0], done[0] | {"quantization": "nf4"}]) == []


@pytest.mark.parametrize("option", ["rslora", "loftq", "pissa"])
def test_fused_layers_compute_what_peft_does_for_the_options_they_cover(option, monkeypatch):
    """rsLoRA changes only the scale and LoftQ/PiSSA only the starting weights, so the fast recipe's fused
    layers keep them (train.lora_layers=auto fuses on CUDA); the same logits as PEFT's layers."""
    from qlora_lab import fused_lora
    from qlora_lab.fused_lora import fuse_lora

    calls = []
    apply = fused_lora.LoRALinear.apply
    monkeypatch.setattr(fused_lora.LoRALinear, "apply", lambda *a: calls.append(1) or apply(*a))
    cfg = make_cfg([*TINY, *OPTIONS[option]])
    model = attach_lora(load_model(model_path(cfg), cfg), cfg).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
        assert fuse_lora(model) == 14
        torch.testing.assert_close(model(input_ids=ids).logits, peft_logits, rtol=1e-4, atol=1e-4)
    assert len(calls) == 14  # every adapted layer took the fused path
