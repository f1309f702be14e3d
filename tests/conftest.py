"""Shared helpers: compose configs in-process; run the CLI in this process (`run_main`, about a second) or as
a real subprocess (`cli`, about ten seconds of start-up: for what only a process shows, such as its exit on a
signal, no stdin, or a fresh interpreter)."""

from __future__ import annotations

import io
import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qlora_lab.config import register

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# Small and fast: short sequences keep the tiny model's 49k-vocab logits cheap.
TINY = [
    "model=tiny_random",
    "dataset.size=24",
    "dataset.eval_size=8",
    "dataset.max_seq_length=96",
    "train.max_steps=8",
    "train.batch_size=4",
    "train.learning_rate=5e-3",
    "train.report_to=[]",
    "train.logging_steps=1",
]

register()


def make_cfg(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def cli(
    *args: str, cwd: Path = ROOT, stdin: str | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "qlora_lab", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str, cwd: Path = ROOT, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m qlora_lab ARGS` in this process, as `python -m` runs it (runpy: qlora_lab/__main__.py as
    `__main__`, which is also how Hydra finds conf/): its exit status, stdout and stderr as `cli` returns
    them. What the job changes in the process (the working folder, sys.argv, signal handlers, logging, the run
    folder's lock) is put back afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    from qlora_lab import callbacks, rundir

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = (
        sys.argv,
        os.getcwd(),
        sys.stdin,
        root.handlers[:],
        root.level,
        {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)},
    )
    absl = sys.modules.get("absl.logging")  # imported with rouge-score
    if absl is not None:
        # absl's handler closes the stream it holds when Hydra's logging setup resets all handlers, unless
        # that is the current sys.stderr: under the redirect below, pytest's capture file. In a CLI process
        # it holds the process's own stderr.
        absl.get_absl_handler().python_handler.setStream(sys.__stderr__)
    sys.argv = ["qlora_lab", *args]
    sys.stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode()))  # piped, as `cli` pipes it: no TTY
    os.chdir(cwd)
    GlobalHydra.instance().clear()
    callbacks.SWEEP["dir"] = None  # a fresh process has started no sweep
    code: int | str | None = 0
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            # warnings reach stderr, filtered as in a fresh interpreter (pytest would otherwise record them)
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: print(
                warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end=""
            )
            try:
                runpy.run_module("qlora_lab", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code
            except BaseException:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, cwd_before, sys.stdin, handlers, level, handlers_by_signal = saved
        os.chdir(cwd_before)
        for handler in root.handlers:
            if isinstance(handler, logging.FileHandler) and handler not in handlers:
                handler.close()  # the job's log file
        root.handlers[:] = handlers  # Hydra's logging setup took pytest's away
        root.setLevel(level)
        for sig, handler in handlers_by_signal.items():
            signal.signal(sig, handler)
        if rundir._held_lock is not None:  # a process's lock ends with it; this job's must end with the call
            rundir._held_lock.close()
            rundir._held_lock = None
        GlobalHydra.instance().clear()
    if isinstance(code, str):  # sys.exit("message"): the interpreter prints it and exits with 1
        print(code, file=err)
        code = 1
    return subprocess.CompletedProcess(["qlora_lab", *args], code or 0, out.getvalue(), err.getvalue())


def assert_one_sentence_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def assert_refused(result, fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def saved_run_config(run_dir: Path, overrides: list[str]) -> Path:
    """A run folder as far as later stages read it: its .hydra/config.yaml (no training needed to test
    them)."""
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(make_cfg(overrides), run_dir / ".hydra" / "config.yaml")
    return run_dir


# A fake sweep folder laid out as real jobs write it (tests/test_decision.py, tests/test_web.py): no training.
LORA_PEAK, QLORA_PEAK = 3.0, 2.0


def add_job(
    sweep_dir,
    num: int,
    quantization: str,
    size: int,
    seed: int,
    eval_loss: float,
    wall_s: float,
    peak: float,
    status: str = "completed",
    seeded: bool = True,
    curve: list | None = None,
) -> str:
    overrides = [f"quantization={quantization}", f"dataset.size={size}"] + (
        [f"train.seed={seed}"] if seeded else []
    )
    job = sweep_dir / f"{num}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    cfg = {
        "quantization": {"method": quantization},
        "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "dataset": {"name": "gsm8k", "size": size, "seed": 42, "max_seq_length": 128},
        "train": {"seed": seed, "batch_size": 4, "grad_accum": 1},
        "recipe": "paper",
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "run.json").write_text(
        json.dumps({"status": status, "hardware": {"device": "cpu", "cpu_count": 2}})
    )
    (job / "metrics.json").write_text(
        json.dumps(
            {
                "eval/loss": eval_loss,
                "time/wall_s": wall_s,
                "train/runtime_s": wall_s - 5.0,  # the rest: loading and evaluation
                "memory/peak_gib": peak,
                "train/tokens_per_s": 100.0,
                "data/train_examples": size,
            }
            | ({"eval/curve": curve} if curve else {})
        )
    )
    return job.name


def fake_sweep(sweep_dir, gaps: dict[int, list[float]], modes=("none", "nf4")) -> dict:
    """One LoRA and one QLoRA job per size and seed; QLoRA's eval loss = LoRA's + the gap given for that seed.
    Returns {(mode, size, seed): job folder name}."""
    jobs, num = {}, 0
    for size, seed_gaps in gaps.items():
        for seed, gap in enumerate(seed_gaps, start=42):
            lora_loss = 1.5 + 0.01 * seed  # differs between seeds: only the pairing removes it
            for q in modes:
                loss, wall, peak = (
                    (lora_loss, 10.0, LORA_PEAK) if q == "none" else (lora_loss + gap, 12.0, QLORA_PEAK)
                )
                jobs[(q, size, seed)] = add_job(sweep_dir, num, q, size, seed, loss, wall, peak)
                num += 1
    return jobs


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """One tiny LoRA run on the unquantized base (no eval before training), trained in-process once for the
    whole session, with its .hydra/config.yaml as Hydra writes it (later CLI stages continue the run). A
    module that adds to a run (merge, export) works on its own copy: `copy_run`."""
    from qlora_lab.pipelines import train
    from qlora_lab.rundir import Run

    run_dir = tmp_path_factory.mktemp("lora_run")
    cfg = make_cfg([*TINY, "quantization=none", "train.eval_before=false"])
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run = Run(dir=run_dir, source=run_dir)
    run.start(cfg)
    train.run(cfg, run)
    run.finish()
    return cfg, run_dir


def copy_run(run_dir: Path, tmp_path_factory, name: str) -> Path:
    copy = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.fixture(scope="session")
def tokenizer():
    from qlora_lab.models import load_tokenizer, tokenizer_path

    return load_tokenizer(tokenizer_path(make_cfg()))


# The modules by the time they take on 2 cores (measured with --durations), the longest first; the others
# (short) follow in file order. `make test` gives each xdist worker whole modules (--dist
# loadscope) in this order (--no-loadscope-reorder), so that the two workers end with short modules and finish
# together.
SLOWEST_FIRST = [
    "test_distributed.py",
    "test_decision.py",
    "test_sweep.py",
    "test_web.py",
    "test_export.py",
    "test_cli.py",
    "test_faults.py",
    "test_bad_inputs.py",
    "test_resume.py",
    "test_lora_variants.py",
    "test_fast_path.py",
    "test_inference.py",
    "test_conversations.py",
    "test_train.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
