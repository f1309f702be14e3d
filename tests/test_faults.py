"""Faults around a run rather than mistakes in its config: two processes on one run folder, Ctrl-C on a sweep,
a full disk. Each ends in one sentence, and what was written stays safe."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from qlora_lab.config import ConfigError

from .conftest import ROOT, TINY, assert_refused, run_main, saved_run_config

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
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_on_a_run_folder_is_refused_naming_the_live_one(interrupted_run):
    from qlora_lab.rundir import hold_run_dir

    proc = holder(interrupted_run)
    try:
        with pytest.raises(
            ConfigError, match=rf"run_dir=.*run is in use by another process \(pid {proc.pid} on "
        ):
            hold_run_dir(interrupted_run)
    finally:
        proc.kill()
        proc.wait()
    hold_run_dir(interrupted_run)  # the OS let go of the dead process's lock


def test_concurrent_resume_is_refused_and_leaves_the_run_alone(interrupted_run):
    before = (interrupted_run / "run.json").read_text()
    proc = holder(interrupted_run)
    try:
        result = run_main("train.resume=true", f"run_dir={interrupted_run}")  # this process: not the holder
    finally:
        proc.kill()
        proc.wait()
    assert_refused(result, [f"run_dir={interrupted_run}", f"in use by another process (pid {proc.pid} on"])
    assert (interrupted_run / "run.json").read_text() == before


def test_resume_with_another_hydra_run_dir_is_refused(interrupted_run, tmp_path):
    result = run_main(
        "train.resume=true", f"run_dir={interrupted_run}", f"hydra.run.dir={tmp_path / 'other'}"
    )
    assert_refused(result, ["train.resume=true", f"hydra.run.dir={tmp_path / 'other'}", "drop hydra.run.dir"])
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("launcher", ["basic", "isolated"])
def test_ctrl_c_on_a_sweep_stops_it_with_one_line(tmp_path, launcher):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-training in the first job: that
    job saves a checkpoint and ends `interrupted`, no further job starts, and the sweep ends with one line
    saying how to resume it, not a traceback (isolated: the job runs in a process of its own, the launcher
    waits for it)."""
    import signal

    sweep_dir = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qlora_lab",
            "-m",
            *TINY,
            "quantization=none",
            "train.max_steps=400",
            "train.eval_before=false",
            f"hydra/launcher={launcher}",
            "dataset.size=8,12",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:  # the first logged step: training is under way
        if "'loss'" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert (
        len(lines) == 1
        and lines[0].startswith("interrupted at step ")
        and "in job #0 (SIGINT received" in lines[0]
    )
    assert lines[0].endswith(f"hydra.sweep.dir={sweep_dir} train.resume=true")
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir()]
    assert len(jobs) == 1  # the second job never started
    record = json.loads((jobs[0] / "run.json").read_text())
    assert record["status"] == "interrupted" and record["last_checkpoint"]


# ---------------------------------------------------------------- a full disk


# The real CLI (in this process: `run_main`) with a full disk faked: no space at all, or the save of
# checkpoint N writing part of its folder before the disk is full.
def no_space_at_all(monkeypatch):
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=0))


def disk_full_at_checkpoint(monkeypatch, step: int):
    import transformers

    original = transformers.Trainer._save_checkpoint

    def save(self, model, trial):
        if self.state.global_step == step:
            folder = os.path.join(self.args.output_dir, f"checkpoint-{step}")
            os.makedirs(folder)
            open(os.path.join(folder, "adapter_model.safetensors"), "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, model, trial)

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save)


def test_no_space_at_start_is_one_sentence_before_anything_is_written(tmp_path, monkeypatch):
    run_dir = tmp_path / "out" / "run"
    no_space_at_all(monkeypatch)
    result = run_main(*TINY, f"hydra.run.dir={run_dir}")
    assert_refused(result, [f"no space left on the disk holding {run_dir} (0 bytes free)", "free some space"])
    assert not run_dir.exists()


def test_disk_full_while_training_is_one_sentence_and_the_run_resumes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = [*TINY, "quantization=none", "train.save_steps=2", "train.eval_before=false"]
    disk_full_at_checkpoint(monkeypatch, 4)
    result = run_main(*args, f"hydra.run.dir={run_dir}")
    assert_refused(
        result,
        [
            f"no space left on the disk holding {run_dir} while writing the training run",
            "needed",
            f"train.resume=true run_dir={run_dir}",
        ],
    )
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["last_checkpoint"].endswith("checkpoint-2")
    assert (
        run_dir / "checkpoints" / "checkpoint-4"
    ).is_dir()  # left unmarked: resuming ignores and removes it

    monkeypatch.undo()  # space freed
    again = run_main("train.resume=true", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["attempts"][-1]["status"] == "failed"


def test_disk_full_in_merge_or_export_removes_the_partial_files_and_says_what_is_needed(tmp_path):
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from qlora_lab.__main__ import disk_space_for
    from qlora_lab.rundir import Run, disk_full

    from .conftest import make_cfg

    source = tmp_path / "run"
    (source / "merged").mkdir(parents=True)
    (source / "merged" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1000, 1000)}, source / "merged" / "model.safetensors")  # 1e6 weights
    (source / "export").mkdir()
    partial = source / "export" / "model-q8_0.gguf.tmp"
    partial.write_bytes(b"partial")
    cfg = make_cfg([*TINY, "pipeline=export", "export.targets=[gguf:q8_0,gguf:f16]"])
    run = Run(dir=tmp_path / "job", source=source)
    # safetensors' own writer reports a full disk as a SafetensorError (its text, seen on a full tmpfs)
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full(full) and not disk_full(SafetensorError("invalid header"))
    with pytest.raises(ConfigError) as e, disk_space_for("export", cfg, run):
        raise full
    assert not partial.exists()
    message = str(e.value)
    assert message.startswith(
        f"no space left on the disk holding {source / 'export'} while writing the export"
    )
    # 1e6 weights x (34/32 + 2) bytes = 3.06e6 bytes
    assert "about 2.9 MiB needed" in message and "model-q8_0.gguf.tmp removed" in message, message
    assert f"pipeline=export run_dir={source}" in message

    (source / "merged.tmp").mkdir()
    (source / "merged.tmp" / "model.safetensors").write_bytes(b"partial")
    with (
        pytest.raises(
            ConfigError,
            match=r"while writing merged/ .*about .* needed; the partial merged.tmp removed\); "
            r"free some space, then merge again",
        ),
        disk_space_for("merge", cfg, run),
    ):
        raise OSError(28, "No space left on device")
    assert not (source / "merged.tmp").exists()


# ---------------------------------------------------------------- bitsandbytes' start-up warning


def test_the_kernels_community_warning_alone_is_silenced():
    """bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" concerns a CPU layout this
    project never uses; other messages of the same logger still get through."""
    code = (
        "import logging; logging.basicConfig(); {first}import bitsandbytes; "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another message')"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ours = subprocess.run(
        [sys.executable, "-c", code.format(first="import qlora_lab; ")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "gemm_4bit_forward" not in ours.stderr and "another message" in ours.stderr, ours.stderr
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():  # where bitsandbytes warns at all, it does so without the filter
        plain = subprocess.run(
            [sys.executable, "-c", code.format(first="")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Failed to load CPU gemm_4bit_forward from kernels-community" in plain.stderr, plain.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: the tiny model's first checkpoint (3.8 MiB) fits, the second does not. Needs the right
    to mount (root in most containers); skipped elsewhere."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk_during_training_then_resume_once_space_is_freed(small_disk):
    run_dir = small_disk / "run"
    result = run_main(
        *TINY,
        "quantization=none",
        "train.save_steps=2",
        "train.eval_before=false",
        f"hydra.run.dir={run_dir}",
    )
    assert_refused(
        result,
        [
            f"no space left on the disk holding {run_dir} while writing the training run (0 bytes "
            f"free, about",
            f"train.resume=true run_dir={run_dir}",
        ],
    )
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["last_checkpoint"].endswith("checkpoint-2")

    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)  # space freed
    again = run_main("train.resume=true", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "checkpoint-2" in again.stdout
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_a_really_full_disk_in_merge_and_export_leaves_no_partial_files(small_disk, tmp_path):
    import shutil

    trained = tmp_path / "trained"
    result = run_main(
        *TINY,
        "quantization=none",
        "train.max_steps=2",
        "train.save_steps=null",
        "train.eval_before=false",
        f"hydra.run.dir={trained}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = small_disk / "run"
    shutil.copytree(trained, run)  # 3.6 MiB of the 6: the merged model (12 MiB) cannot fit

    merge = run_main("pipeline=merge", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'merge'}")
    assert_refused(
        merge,
        [
            f"no space left on the disk holding {run} while writing merged/",
            "MiB needed",
            "the partial merged.tmp removed",
            f"pipeline=merge run_dir={run}",
        ],
    )
    assert not (run / "merged.tmp").exists() and not (run / "merged").exists()

    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
    assert (
        run_main("pipeline=merge", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'merge2'}").returncode == 0
    )
    used = shutil.disk_usage(small_disk).used  # now leave 1 MiB: the q8_0 GGUF (~3.4 MiB) cannot fit
    subprocess.run(["mount", "-o", f"remount,size={used + (1 << 20)}", str(small_disk)], check=True)
    export = run_main(
        "pipeline=export", f"run_dir={run}", "export.measure=false", f"hydra.run.dir={tmp_path / 'export'}"
    )
    assert_refused(
        export,
        [
            f"no space left on the disk holding {run / 'export'} while writing the export",
            "MiB needed",
            "model-q8_0.gguf.tmp removed",
            f"pipeline=export run_dir={run}",
        ],
    )
    assert not list((run / "export").glob("*.tmp"))
