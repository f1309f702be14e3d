"""Interrupted runs: a real CLI process gets SIGKILL or SIGINT mid-training, then `train.resume=true
run_dir=R` ends with the same adapter (bitwise, CPU fp32) and step count as an uninterrupted run; sweeps
resume too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, TINY, run_main

# 8 steps over 24 examples in batches of 4: the run crosses an epoch boundary (the data order must be
# restored); lora.dropout (0.05 by default) draws random numbers every step (the RNG state must be restored).
RUN = [*TINY, "quantization=none", "train.save_steps=2", "train.eval_before=false"]

# Runs the real CLI, but sends this process a signal at the end of one optimizer step: a deterministic
# "mid-run".
KILLER = """
import os, runpy, signal, sys
import transformers.trainer_callback as tc

step, sig = int(os.environ["KILL_AT_STEP"]), getattr(signal, os.environ["KILL_SIGNAL"])
original = tc.DefaultFlowCallback.on_step_end

def on_step_end(self, args, state, control, **kwargs):
    if state.global_step == step:
        os.kill(os.getpid(), sig)
    return original(self, args, state, control, **kwargs)

tc.DefaultFlowCallback.on_step_end = on_step_end
sys.argv = ["qlora_lab", *sys.argv[1:]]
runpy.run_module("qlora_lab", run_name="__main__", alter_sys=True)
"""


def killed_run(tmp_path, run_dir, signal_name: str, step: int) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(
        os.environ,
        KILL_AT_STEP=str(step),
        KILL_SIGNAL=signal_name,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
        TOKENIZERS_PARALLELISM="false",
    )
    return subprocess.run(
        [sys.executable, str(script), *RUN, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def info(run_dir) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "whole"
    result = run_main(*RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assert_same_as_uninterrupted(run_dir, uninterrupted):
    mine, reference = adapter(run_dir), adapter(uninterrupted)
    assert mine.keys() == reference.keys()
    for name in reference:
        assert torch.equal(mine[name], reference[name]), name  # bitwise: CPU fp32, same data order and RNG
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["train/steps"] == 8 == json.loads((uninterrupted / "metrics.json").read_text())["train/steps"]
    )
    assert info(run_dir)["status"] == "completed"


def test_sigkill_mid_training_then_resume_gives_the_same_adapter(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    killed = killed_run(tmp_path, run_dir, "SIGKILL", step=5)
    assert killed.returncode == -9
    record = info(run_dir)
    # nothing could record the ending: run.json says running, with the last complete checkpoint (step 4)
    assert record["status"] == "running" and record["last_checkpoint"].endswith("checkpoint-4")
    from qlora_lab.rundir import run_status

    status, why = run_status(record)
    assert status == "died" and str(record["pid"]) in why

    resumed = run_main("train.resume=true", f"run_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    assert_same_as_uninterrupted(run_dir, uninterrupted)
    assert info(run_dir)["attempts"][0]["status"] == "running"  # the killed attempt, kept in the record


def test_sigint_stops_cleanly_with_a_checkpoint_then_resume_gives_the_same_adapter(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    stopped = killed_run(tmp_path, run_dir, "SIGINT", step=3)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    record = info(run_dir)
    assert record["status"] == "interrupted" and record["step"] == 3
    assert record["last_checkpoint"].endswith("checkpoint-3") and "SIGINT" in record["error"]
    assert "train.resume=true" in stopped.stderr

    resumed = run_main("train.resume=true", f"run_dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as_uninterrupted(run_dir, uninterrupted)

    again = run_main(
        "train.resume=true", f"run_dir={run_dir}"
    )  # a completed run: nothing to do, nothing touched
    assert again.returncode == 0 and "already completed" in again.stdout


def test_resume_refuses_a_changed_hyperparameter_and_leaves_the_run_alone(tmp_path, uninterrupted):
    before = (uninterrupted / "run.json").read_text()
    result = run_main("train.resume=true", f"run_dir={uninterrupted}", "train.learning_rate=1e-3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: train.learning_rate=0.001 differs from the run being resumed" in result.stderr
    assert (uninterrupted / "run.json").read_text() == before


def test_resumed_sweep_skips_completed_jobs_resumes_interrupted_and_runs_missing(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # the basic launcher runs the jobs in this process: cheaper than a fresh process per job
    sweep = [
        "-m",
        *TINY,
        "quantization=none",
        "train.max_steps=2",
        "train.eval_before=false",
        "hydra/launcher=basic",
        "dataset.size=8,12,16",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    first = run_main(*sweep)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 3
    done, interrupted, missing = jobs
    done_record = (done / "run.json").read_text()
    record = info(interrupted) | {"status": "interrupted", "error": "SIGTERM received at step 1"}
    (interrupted / "run.json").write_text(json.dumps(record))
    import shutil

    shutil.rmtree(missing)

    again = run_main(*sweep, "train.resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (done / "run.json").read_text() == done_record  # skipped: not even its record was touched
    assert f"{done} already completed" in again.stdout
    resumed = info(interrupted)
    assert resumed["status"] == "completed" and resumed["attempts"][-1]["status"] == "interrupted"
    assert info(missing)["status"] == "completed" and "attempts" not in info(missing)
    assert sorted(p for p in sweep_dir.iterdir() if p.is_dir()) == jobs  # the same job folders, no new ones
