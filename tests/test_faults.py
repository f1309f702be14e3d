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
