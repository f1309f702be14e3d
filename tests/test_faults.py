"""Faults around a run rather than mistakes in its config: two processes on one run folder, Ctrl-C on a sweep, a full
disk. Each ends in one sentence, and what was written stays safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qlora_lab.config import ConfigError

from .conftest import ROOT, TINY, cli
from .test_bad_inputs import assert_refused, saved_run_config

HOLD = """
import sys, time
from pathlib import Path
from qlora_lab.rundir import hold_run_dir
hold_run_dir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def interrupted_run(tmp_path):
    run = saved_run_config(tmp_path / "run", TINY)
    (run / "run.json").write_text(json.dumps({"status": "interrupted", "pid": 1}))
    return run


def holder(run):
    """Another process holding the run folder, as a training run does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_on_a_run_folder_is_refused_naming_the_live_one(interrupted_run):
    from qlora_lab.rundir import hold_run_dir

    proc = holder(interrupted_run)
    try:
        with pytest.raises(ConfigError, match=rf"run_dir=.*run is in use by another process \(pid {proc.pid} on "):
            hold_run_dir(interrupted_run)
    finally:
        proc.kill()
        proc.wait()
    hold_run_dir(interrupted_run)  # the OS let go of the dead process's lock


def test_concurrent_resume_is_refused_and_leaves_the_run_alone(interrupted_run):
    before = (interrupted_run / "run.json").read_text()
    proc = holder(interrupted_run)
    try:
        result = cli("train.resume=true", f"run_dir={interrupted_run}")
    finally:
        proc.kill()
        proc.wait()
    assert_refused(result, [f"run_dir={interrupted_run}", f"in use by another process (pid {proc.pid} on"])
    assert (interrupted_run / "run.json").read_text() == before


def test_resume_with_another_hydra_run_dir_is_refused(interrupted_run, tmp_path):
    result = cli("train.resume=true", f"run_dir={interrupted_run}", f"hydra.run.dir={tmp_path / 'other'}")
    assert_refused(result, ["train.resume=true", f"hydra.run.dir={tmp_path / 'other'}", "drop hydra.run.dir"])
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("launcher", ["basic", "isolated"])
def test_ctrl_c_on_a_sweep_stops_it_with_one_line(tmp_path, launcher):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-training in the first job: that job
    saves a checkpoint and ends `interrupted`, no further job starts, and the sweep ends with one line saying how to
    resume it, not a traceback (isolated: the job runs in a process of its own, the launcher waits for it)."""
    import signal

    sweep_dir = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "qlora_lab", "-m", *TINY, "quantization=none", "train.max_steps=400",
                             "train.eval_before=false", f"hydra/launcher={launcher}", "dataset.size=8,12",
                             f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # the first logged step: training is under way
        if "'loss'" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    # (the line may follow the progress bar that training left unfinished on the same terminal line)
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "in job #0 (SIGINT received at step" in lines[0]
    assert lines[0].endswith(f"hydra.sweep.dir={sweep_dir} train.resume=true")
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir()]
    assert len(jobs) == 1  # the second job never started
    record = json.loads((jobs[0] / "run.json").read_text())
    assert record["status"] == "interrupted" and record["last_checkpoint"]
