"""The command line (in-process through its entry, `run_main`): bad input gets one clear sentence and a
non-zero exit; a real run on SmolLM2 through every stage of the quickstart."""

from __future__ import annotations

import json

import pytest

from .conftest import TINY, assert_one_sentence_error, run_main


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["dataset.path=/no/such/file.json"], ["dataset.path=/no/such/file.json", "no such file"]),
        (
            ["model.name_or_path=/no/such/model", "model.random_init=null"],
            ["model.name_or_path=/no/such/model"],
        ),
        (["quantization=none", "quantization.double_quant=true"], ["quantization.double_quant", "nf4"]),
        (["pipeline.stages=[train,fly]"], ["fly"]),
    ],
)
def test_bad_input_is_one_sentence(tmp_path, args, fragments):
    result = run_main(*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_sentence_error(result, *fragments)
    info = (
        json.loads((tmp_path / "run" / "run.json").read_text())
        if (tmp_path / "run" / "run.json").exists()
        else {}
    )
    assert info.get("status") in (None, "failed")


def test_help_is_the_apps_own_page():
    result = run_main("--help")
    assert result.returncode == 0 and "== Common commands ==" in result.stdout
    assert (
        "python -m qlora_lab +experiment=quickstart" in result.stdout
        and "powered by Hydra" not in result.stdout
    )
    groups = result.stdout.split("== Config groups", 1)[1].split("==", 2)[1]
    assert "quantization: base_quantization, fp4, int8, nf4, none" in groups
    assert "accelerate" not in groups  # accelerate launcher configs live outside the config search path


def test_record_missing_a_field_is_named(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(
        json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 5 + [{"instruction": "c"}])
    )
    result = run_main(
        *TINY, f"dataset.path={data}", "dataset.eval_size=1", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert_one_sentence_error(result, "record 5", "'output'")


def test_empty_dataset_is_named(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    result = run_main(*TINY, f"dataset.path={data}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_sentence_error(result, str(data))


def test_existing_run_dir_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("precious: true\n")
    (run_dir / "metrics.json").write_text('{"eval/loss": 1.0}')
    result = run_main(*TINY, f"hydra.run.dir={run_dir}")
    assert_one_sentence_error(result, "hydra.run.dir", "not empty")
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "precious: true\n"
    assert (run_dir / "metrics.json").read_text() == '{"eval/loss": 1.0}'


@pytest.mark.slow
def test_real_short_run_on_smollm2(tmp_path):
    run_dir = tmp_path / "run"
    # every stage of the quickstart on the real model, kept small: 3 steps of 2 examples, short generations
    result = run_main(
        "+experiment=quickstart",
        "dataset.size=6",
        "dataset.eval_size=4",
        "train.batch_size=2",
        "train.max_steps=3",
        "train.logging_steps=1",
        "train.speed_skip_steps=1",
        "generation.max_new_tokens=16",
        "eval.max_samples=2",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["params/total"] > 100e6  # the real 135M model, not the tiny one
    assert metrics["train/steps"] == 3 and metrics["train/tokens_per_s"] > 0
    assert 0 < metrics["eval/loss"] < 5 and 0 < metrics["eval/loss_before"] < 5
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").iterdir())
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["versions"]["transformers"]
