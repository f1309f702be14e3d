"""Multirun sweeps through the real CLI: one row per job, ratios that match the jobs' own metrics, failures
reported."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

from qlora_lab.report import main as report_main
from qlora_lab.report import write_report

from .conftest import ROOT, run_main

# 2 modes x 2 sizes on the tiny model, plus a size the data cannot supply: a job that fails at run time.
SWEEP = [
    "-m",
    "+experiment=lora_vs_qlora",
    "model=tiny_random",
    "quantization=none,nf4",
    "dataset.size=8,16,5000",
    "dataset.eval_size=4",
    "dataset.max_seq_length=64",
    "train.max_steps=2",
    "train.speed_skip_steps=0",
]


def read_rows(sweep_dir):
    with (sweep_dir / "summary.csv").open() as f:
        return {row["job"]: row for row in csv.DictReader(f)}


def metrics(sweep_dir, job):
    return json.loads((sweep_dir / job / "metrics.json").read_text())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweeps") / "lora_vs_qlora"
    # launched in this process; the isolated launcher still runs each job in a fresh one
    result = run_main(*SWEEP, f"hydra.sweep.dir={sweep_dir}")
    # a sweep with failed jobs fails, and says which and why
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: 2 of 6 jobs did not complete:" in result.stderr
    listed = result.stderr.split("jobs did not complete:", 1)[1]
    assert listed.count("dataset.size=5000 but") == 2 and "Traceback" not in result.stderr
    return sweep_dir, result


def test_sweep_writes_one_row_per_job_with_ratios_from_metrics(sweep):
    sweep_dir, result = sweep
    rows = read_rows(sweep_dir)
    assert len(rows) == 6 and len(list(sweep_dir.glob("*/.hydra"))) == 6
    done = {job: r for job, r in rows.items() if r["status"] == "completed"}
    assert sorted((r["quantization"], r["dataset_size"]) for r in done.values()) == [
        ("nf4", "16"),
        ("nf4", "8"),
        ("none", "16"),
        ("none", "8"),
    ]
    # same seeds in every job, whatever the mode or size
    assert {(r["seed"], r["data_seed"]) for r in rows.values()} == {("42", "42")}
    for job, r in done.items():
        lora = next(
            j
            for j, b in done.items()
            if b["quantization"] == "none" and b["dataset_size"] == r["dataset_size"]
        )
        mine, base = metrics(sweep_dir, job), metrics(sweep_dir, lora)
        assert float(r["tokens_per_s"]) == pytest.approx(mine["train/tokens_per_s"])
        assert float(r["time_ratio"]) == pytest.approx(mine["time/wall_s"] / base["time/wall_s"])
        assert float(r["lora_speedup"]) == pytest.approx(
            base["train/tokens_per_s"] / mine["train/tokens_per_s"]
        )
        assert float(r["memory_ratio"]) == pytest.approx(mine["memory/peak_gib"] / base["memory/peak_gib"])
        assert (
            0 < int(r["train_examples"]) <= int(r["dataset_size"])
        )  # a prompt longer than 64 tokens is dropped
    # the markdown table holds both modes at both sizes, and the callback printed it
    md = (sweep_dir / "summary.md").read_text()
    for size in ("8", "16"):
        assert f"| {size} | LoRA |" in md and f"| {size} | QLoRA nf4 |" in md
    assert "## LoRA vs QLoRA per data size" in result.stdout and "summary.md" in result.stdout
    for name in ("time_vs_size.png", "peak_memory.png", "eval_loss.png"):
        assert (sweep_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_submitit_local_launcher_gives_the_same_jobs_and_summary(sweep, tmp_path):
    """hydra/launcher=submitit_local runs the cluster launcher's code path (submitit pickles each job and runs
    it in a process of its own, as on Slurm) on this machine: two jobs of the isolated sweep above, run again
    through it, give the same job folders, the same files in them and the same summary columns, filled the
    same way."""
    isolated_dir, _ = sweep
    submitit_dir = tmp_path / "submitit"
    args = [a for a in SWEEP if not a.startswith(("quantization=", "dataset.size="))]
    result = run_main(
        *args,
        "hydra/launcher=submitit_local",
        "quantization=none",
        "dataset.size=8,16",
        f"hydra.sweep.dir={submitit_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    isolated, submitit = read_rows(isolated_dir), read_rows(submitit_dir)
    assert set(submitit) <= set(isolated) and len(submitit) == 2  # the same folder names: <n>_<overrides>
    with (isolated_dir / "summary.csv").open() as a, (submitit_dir / "summary.csv").open() as b:
        assert a.readline() == b.readline()  # the same columns
    for job, row in submitit.items():
        assert row["status"] == "completed"
        filled = {k for k, v in row.items() if v not in ("", None)}
        assert filled == {k for k, v in isolated[job].items() if v not in ("", None)}, job
        assert metrics(submitit_dir, job).keys() == metrics(isolated_dir, job).keys()
        for name in ("run.json", "__main__.log", ".hydra/config.yaml", "adapter/adapter_config.json"):
            assert (submitit_dir / job / name).is_file(), name
        assert (submitit_dir / job / ".hydra" / "config.yaml").read_text() == (
            isolated_dir / job / ".hydra" / "config.yaml"
        ).read_text()


def test_failed_job_is_reported_with_its_error(sweep):
    sweep_dir, _ = sweep
    failed = [r for r in read_rows(sweep_dir).values() if r["status"] != "completed"]
    assert len(failed) == 2 and {r["quantization"] for r in failed} == {"none", "nf4"}
    for r in failed:
        assert r["status"] == "failed" and "dataset.size=5000" in r["error"] and not r["time_ratio"]
    md = (sweep_dir / "summary.md").read_text()
    assert "## Failed jobs" in md and md.count("dataset.size=5000 but") == 2


def test_report_command_rebuilds_the_same_summary(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    for name in ("summary.csv", "summary.md", "eval_loss.png"):
        (copy / name).unlink()
    assert report_main([str(copy)]) == 0  # `python -m qlora_lab.report COPY`
    out = capsys.readouterr()
    assert read_rows(copy) == read_rows(sweep_dir) and (copy / "eval_loss.png").is_file(), out.err
    assert "| 16 | QLoRA nf4 |" in out.out


def test_report_marks_dead_and_unstarted_jobs_failed(sweep, tmp_path):
    """A job whose process died leaves run.json at `running` (its pid is gone: `died`); one stopped before it
    started leaves none."""
    sweep_dir, _ = sweep
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    done = [job for job, r in read_rows(sweep_dir).items() if r["status"] == "completed"]
    info = json.loads((copy / done[0] / "run.json").read_text()) | {"status": "running"}
    (copy / done[0] / "run.json").write_text(json.dumps(info))
    (copy / done[1] / "run.json").unlink()
    write_report(copy)
    rows = read_rows(copy)
    assert (
        rows[done[0]]["status"] == "died" and "is gone without recording an ending" in rows[done[0]]["error"]
    )
    assert rows[done[1]]["status"] == "failed" and "no run.json" in rows[done[1]]["error"]
    assert sum(r["status"] == "completed" for r in rows.values()) == 2


def test_report_shows_evaluate_metrics_when_jobs_have_them(sweep, tmp_path):
    sweep_dir, _ = sweep
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    done = [job for job, r in read_rows(sweep_dir).items() if r["status"] == "completed"]
    for i, job in enumerate(done):
        m = metrics(copy, job) | {
            "eval/perplexity": 10.0 + i,
            "eval/accuracy": 2.5 * i,
            "eval_base/accuracy": 0.0,
        }
        (copy / job / "metrics.json").write_text(json.dumps(m))
    write_report(copy)
    rows = read_rows(copy)
    assert [float(rows[job]["eval_perplexity"]) for job in done] == [10.0 + i for i in range(len(done))]
    summary = (copy / "summary.md").read_text()
    assert "## Quality" in summary and "| base accuracy |" in summary


def test_report_command_rejects_a_folder_without_jobs(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2  # `python -m qlora_lab.report DIR`
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no Hydra job folders" in err and "Traceback" not in err


TOY_APP = """
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base=None, config_path=None)
def main(cfg):
    Path(HydraConfig.get().runtime.output_dir, "pid").write_text(str(os.getpid()))
    if cfg.n == 2:
        os._exit(9)  # the process dies as if killed (out of memory): no exception, nothing written


if __name__ == "__main__":
    main()
"""


def test_isolated_launcher_runs_each_job_in_its_own_process_and_survives_a_dead_one(tmp_path):
    (tmp_path / "app.py").write_text(TOY_APP)
    sweep_dir = tmp_path / "sweep"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "app.py",
            "-m",
            "+n=1,2,3",
            f"hydra.sweep.dir={sweep_dir}",
            "hydra.launcher._target_=hydra_plugins.qlora_lab_launcher.isolated_launcher.IsolatedLauncher",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = [sweep_dir / str(num) for num in range(3)]  # Hydra's default subdir: the job number
    pids = [int((j / "pid").read_text()) for j in jobs]
    assert len(set(pids)) == 3  # a fresh process per job, and the job after the dead one still ran
    dead = json.loads((jobs[1] / "run.json").read_text())
    assert dead["status"] == "failed" and "process died" in dead["error"]
    assert not (jobs[0] / "run.json").exists() and not (jobs[2] / "run.json").exists()


GPU_APP = """
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base=None, config_path=None)
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    start = time.time()
    time.sleep(1.5)
    (out / "gpu").write_text(f"{os.environ.get('CUDA_VISIBLE_DEVICES')} {start} {time.time()}")


if __name__ == "__main__":
    main()
"""


def run_gpu_app(tmp_path, visible: str, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(GPU_APP)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": visible}
    return subprocess.run(
        [
            sys.executable,
            "app.py",
            "-m",
            "+n=1,2,3,4",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher._target_=hydra_plugins.qlora_lab_launcher.isolated_launcher.IsolatedLauncher",
            *extra,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_isolated_launcher_runs_one_job_per_gpu_at_once(tmp_path):
    """With GPUs 3 and 5 visible, 4 jobs run two at a time, each job seeing exactly one of the two GPUs."""
    out = run_gpu_app(tmp_path, "3,5")
    assert out.returncode == 0, out.stderr[-3000:]
    records = [(tmp_path / "sweep" / str(n) / "gpu").read_text().split() for n in range(4)]
    gpus = [r[0] for r in records]
    assert sorted(gpus) == ["3", "3", "5", "5"]
    spans = sorted((float(a), float(b), g) for g, a, b in records)
    # the first two jobs overlap in time, on different GPUs; no GPU ever runs two jobs at once
    assert spans[1][0] < spans[0][1] and spans[0][2] != spans[1][2]
    for gpu in ("3", "5"):
        mine = sorted(s for s in spans if s[2] == gpu)
        assert all(later[0] >= earlier[1] for earlier, later in zip(mine, mine[1:], strict=False))
    assert "2 at a time, one GPU each" in out.stderr + out.stdout


def test_isolated_launcher_refuses_more_jobs_at_once_than_gpus(tmp_path):
    out = run_gpu_app(tmp_path, "0,1", "+hydra.launcher.n_jobs=3")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: hydra.launcher.n_jobs=3 but 2 GPUs are visible, and each job at once needs a GPU of its own; "
        "set hydra.launcher.n_jobs=2 or auto."
    )
    assert not (tmp_path / "sweep" / "0").exists()


def test_sweep_over_paths_keeps_one_folder_level_per_job_and_reports_them(tmp_path):
    """`-m dataset.path=a/d.json,b/d.json`: Hydra's override_dirname holds the '/' of the values; the job
    folders must still be one level (job_dirname writes it %2F), and the report must find every job."""
    records = [{"instruction": f"Say hi {i}.", "output": "Hi."} for i in range(12)]
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "d.json")
        paths[-1].write_text(json.dumps(records))
    sweep_dir = tmp_path / "sweep"
    result = run_main(
        "-m",
        "model=tiny_random",
        f"dataset.path={paths[0]},{paths[1]}",
        "dataset.size=8",
        "dataset.eval_size=4",
        "dataset.max_seq_length=64",
        "train.max_steps=1",
        "train.eval_before=false",
        "train.report_to=[]",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all((sweep_dir / job / ".hydra" / "config.yaml").is_file() for job in jobs)
    assert "%2Fa%2Fd.json" in jobs[0] and "%2Fb%2Fd.json" in jobs[1]
    rows = read_rows(sweep_dir)
    assert sorted(rows) == jobs and all(r["status"] == "completed" for r in rows.values())


def test_job_dirname_is_one_level_and_bounded():
    from qlora_lab.config import job_dirname

    assert job_dirname("dataset.path=data/a.json,lora.r=8") == "dataset.path=data%2Fa.json,lora.r=8"
    long_a, long_b = (job_dirname(f"dataset.path={'x/' * 200}{c}.json") for c in "ab")
    assert "/" not in long_a and len(long_a.encode()) <= 200 and long_a != long_b


def test_report_finds_jobs_nested_below_the_sweep_folder(tmp_path):
    """A sweep written before job_dirname (or with a hydra.sweep.subdir holding a '/') nests its jobs."""
    from omegaconf import OmegaConf

    from .conftest import make_cfg

    names = ["0_dataset.path=data/a.json", "1_dataset.path=data/b.json"]
    for name in names:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(make_cfg(["model=tiny_random"]), tmp_path / name / ".hydra" / "config.yaml")
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(f"- {name.split('_', 1)[1]}\n")
        (tmp_path / name / "run.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    write_report(tmp_path)
    assert sorted(read_rows(tmp_path)) == names
