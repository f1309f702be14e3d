"""Every row of tests/bad_inputs.py: one sentence naming the field or file, before any data or model is
loaded.

All rows run in-process through `checked_config`, what `python -m qlora_lab` runs before any stage; a few run
through the real command line (exit 2, no traceback, nothing written beyond a failed run.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_lab.__main__ import checked_config
from qlora_lab.config import ConfigError
from qlora_lab.rundir import inherit_from_run

from .bad_inputs import BAD_INPUTS, write_bad_files
from .conftest import ROOT, TINY, assert_refused, cli, make_cfg, run_main, saved_run_config


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    write_bad_files(tmp, saved_run_config)
    saved_run_config(tmp / "run", ["model=tiny_random", "dataset=gsm8k", "dataset.size=8"])
    return tmp


def expand(args: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{run}", str(tmp / "run")) for a in args]


@pytest.mark.parametrize("name,args,fragments", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_refused_up_front(bad_dir, name, args, fragments, monkeypatch):
    import qlora_lab.models as models

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(models, "load_tokenizer", no_model)
    args = (
        expand(args, bad_dir)
        if any(a.startswith("run_dir=") for a in args)
        else [*TINY, *expand(args, bad_dir)]
    )
    cfg = make_cfg(args)
    job_dir = Path(cfg.run_dir) if cfg.train.resume and cfg.run_dir else bad_dir / "job"
    with pytest.raises(ConfigError) as e:
        checked_config(cfg, job_dir, args)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


CLI_ROWS = ["zero lora rank", "+ on a typo", "non-UTF-8 prompts file"]  # ~10 s each: a representative few


def test_bad_inputs_through_the_real_command_line(bad_dir, tmp_path):
    rows = {row[0]: row for row in BAD_INPUTS}
    for i, name in enumerate(CLI_ROWS):
        _, args, fragments = rows[name]
        run_dir = tmp_path / f"run{i}"
        run = (
            cli if i == 0 else run_main
        )  # one real process for the exit status; the others through the same entry
        assert_refused(run(*TINY, *expand(args, bad_dir), f"hydra.run.dir={run_dir}"), fragments)
        # the failure is recorded, and nothing else was written
        assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "__main__.log", "run.json"], name
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "failed" and fragments[0] in info["error"], info


def test_non_utf8_stdin_to_chat_is_named(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_lab",
            *TINY,
            "pipeline=chat",
            "inference=base",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        input=b"Hello\n\xff\xfe broken\n",
        capture_output=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert "error: stdin line 2 is not UTF-8 text" in stderr


def test_trust_remote_code_warns_naming_the_folder():
    cfg = make_cfg([*TINY, "model.trust_remote_code=true", "train.max_steps=1"])
    import io
    from contextlib import redirect_stderr

    from qlora_lab.__main__ import preflight
    from qlora_lab.models import model_path, tokenizer_path

    model_path(cfg), tokenizer_path(cfg)  # a cold cache builds these first, with messages of its own
    err = io.StringIO()
    with redirect_stderr(err):
        preflight(cfg)  # (a cold datasets cache also draws a progress bar here)
    warnings = [line for line in err.getvalue().splitlines() if "trust_remote_code" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "tiny-random-llama" in warnings[0]


# ---------------------------------------------------------------- per-field inheritance


def test_later_stage_inherits_field_by_field(bad_dir):
    run = bad_dir / "run"  # trained on GSM8K, 8 examples, the tiny model
    cfg, inherited = inherit_from_run(
        make_cfg(["pipeline=evaluate", f"run_dir={run}", "dataset.eval_size=4"]),
        run,
        ["pipeline=evaluate", f"run_dir={run}", "dataset.eval_size=4"],
    )
    assert (
        cfg.dataset.path.endswith("gsm8k/train.jsonl") or "gsm8k" in cfg.dataset.path
    )  # the run's data file
    assert cfg.dataset.eval_path and "gsm8k" in cfg.dataset.eval_path
    assert cfg.dataset.size == 8 and cfg.dataset.eval_size == 4  # named: changed; the rest: the run's
    assert "dataset.path" in inherited and "dataset.eval_size" not in inherited
    assert cfg.pipeline.stages == ["evaluate"]  # stage settings are this job's own

    overrides = ["pipeline=infer", f"run_dir={run}", "model.attn_implementation=eager"]
    cfg, _ = inherit_from_run(make_cfg(overrides), run, overrides)
    assert cfg.model.name_or_path == "tiny-random-llama" and cfg.model.attn_implementation == "eager"

    overrides = [
        "pipeline=infer",
        f"run_dir={run}",
        "dataset=alpaca",
    ]  # naming a group option takes that group
    cfg, _ = inherit_from_run(make_cfg(overrides), run, overrides)
    assert "alpaca" in cfg.dataset.path and cfg.model.name_or_path == "tiny-random-llama"


# ---------------------------------------------------------------- run dirs are never shared


def _claim_in_process(path: str, queue) -> None:
    from qlora_lab.callbacks import claim

    queue.put(str(claim(Path(path), ".hydra", explicit=False, key="hydra.run.dir")))


def test_simultaneous_claims_of_one_folder_get_different_folders(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(str(tmp_path / "run"), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    claimed = sorted(queue.get() for _ in procs)
    assert len(set(claimed)) == 4 and claimed[0] == str(tmp_path / "run")


def test_two_simultaneous_launches_get_two_run_dirs(tmp_path):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "qlora_lab", *TINY, "lora.r=0", f"paths.output_dir={tmp_path}", "name=twin"]
    procs = [
        subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        p.communicate(timeout=300)
    runs = sorted((tmp_path / "twin").iterdir())
    assert len(runs) == 2, runs
    pids = {json.loads((r / "run.json").read_text())["pid"] for r in runs}
    assert pids == {p.pid for p in procs}  # each folder holds its own run's record


# ---------------------------------------------------------------- folders that cannot be folders


def test_cache_under_a_file_names_the_environment_variable(tmp_path, monkeypatch):
    from qlora_lab.validation import validate

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("QLORA_LAB_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(ConfigError, match=r"^QLORA_LAB_CACHE=.*file is a file; point it at a folder"):
        validate(make_cfg(TINY))


def test_output_dir_that_is_a_file_is_refused_before_hydra_writes(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_main(*TINY, f"paths.output_dir={tmp_path / 'file'}")
    assert_refused(
        result, [f"paths.output_dir={tmp_path / 'file'}", "cannot hold the run folder", "file is a file"]
    )
    assert (tmp_path / "file").read_text() == "x"


def test_run_dir_given_as_a_file_is_named_as_given(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_main(*TINY, f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert_refused(result, [f"hydra.run.dir={tmp_path / 'file' / 'run'} cannot hold the run folder"])
