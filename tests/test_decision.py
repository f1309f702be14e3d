"""The decision card and the figures over seeds, built from fake sweep folders laid out as real jobs write
them (.hydra/config.yaml, .hydra/overrides.yaml, run.json, metrics.json): no training, so every case is
fast."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from hydra_plugins.qlora_lab_launcher.equal_memory_sweeper import measured_peak
from qlora_lab import callbacks, decision, report
from qlora_lab.decision import interval
from qlora_lab.report import main as report_main
from qlora_lab.report import write_report

from .conftest import LORA_PEAK, QLORA_PEAK, ROOT, add_job, fake_sweep, run_main


def test_interval_is_the_student_t_interval():
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert interval([5.0]) == (5.0, None) and interval([]) == (None, None)


def test_card_gives_a_verdict_per_size_and_the_size_from_which_qlora_is_within_noise(tmp_path):
    # size 8: QLoRA clearly worse (gaps 0.10-0.12); sizes 16 and 32: gaps scattered around 0
    jobs = fake_sweep(tmp_path, {8: [0.10, 0.12, 0.11], 16: [0.01, -0.01, 0.005], 32: [-0.004, 0.003, 0.0]})
    summary = write_report(tmp_path)
    card = (tmp_path / "decision.md").read_text()
    assert summary.index("## Decision") < summary.index(
        "## LoRA vs QLoRA per data size"
    )  # the card comes first
    assert (tmp_path / "decision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mean, half = interval([0.10, 0.12, 0.11])
    assert "its eval loss is within noise of LoRA's from 16 examples on" in card
    assert f"at 8 it is worse by {mean:.4f} ± {half:.4f}" in card
    # training time 7 s / 5 s, not the wall time's 12 / 10
    assert "saves 1.00 GiB of peak memory (-33%)" in card and "costs 40% training time" in card
    row8 = next(line for line in card.splitlines() if line.startswith("| 8 |"))
    assert "| worse |" in row8 and f"{mean:.4f} ± {half:.4f}" in row8
    for seed in (42, 43, 44):  # every run behind the row is linked
        for q in ("none", "nf4"):
            assert f"(<{jobs[(q, 8, seed)]}>)" in row8
    assert "| within noise |" in next(line for line in card.splitlines() if line.startswith("| 32 |"))
    # over the seeds: LoRA's eval loss at size 8 is 1.92, 1.93, 1.94 -> 1.93 ± t(0.975, 2)·0.01/√3
    m, h = interval([1.92, 1.93, 1.94])
    assert f"| 8 | LoRA | 3 | {m:.4f} ± {h:.4f} |" in summary


def test_the_report_compares_training_peaks_not_a_later_stage_s(tmp_path):
    """A job that trained and then evaluated: its evaluation's peak (generation, perplexity) must not stand
    for the memory the mode needs to train."""
    name = add_job(tmp_path, 0, "nf4", 8, 42, 1.0, 10.0, peak=12.0)
    metrics = tmp_path / name / "metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {"memory/train_peak_gib": 2.5}))
    assert report.job_row(tmp_path / name)["peak_gib"] == 2.5
    assert measured_peak(tmp_path / name) == 2.5


def test_single_seed_gives_figures_but_no_verdict(tmp_path):
    fake_sweep(tmp_path, {8: [0.5], 16: [0.4]})
    card = write_report(tmp_path) and (tmp_path / "decision.md").read_text()
    assert (
        "no verdict (fewer than 2 seeds)" in card and "within noise" not in card and "| worse |" not in card
    )
    assert "run the sweep with sweep.repeats=3 or more" in card


def test_single_mode_sweep_says_there_are_no_pairs(tmp_path):
    fake_sweep(tmp_path, {8: [0.0, 0.0]}, modes=("none",))
    card = write_report(tmp_path) and (tmp_path / "decision.md").read_text()
    assert "completed only LoRA jobs: there are no LoRA/QLoRA pairs, so no verdict" in card
    assert "within noise" not in card and not (tmp_path / "decision.png").exists()


def test_pairs_are_made_by_seed_and_a_failed_job_drops_its_pair(tmp_path):
    fake_sweep(tmp_path, {8: [0.01, -0.01]})
    # a third seed whose QLoRA job failed: no pair, so two pairs stay
    add_job(tmp_path, 10, "none", 8, 44, 9.0, 10.0, LORA_PEAK)
    add_job(tmp_path, 11, "nf4", 8, 44, 0.0, 12.0, QLORA_PEAK, status="failed")
    card = write_report(tmp_path) and (tmp_path / "decision.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| 8 |"))
    assert "| QLoRA nf4 | 2 |" in row and "| within noise |" in row and "10_" not in row


def test_sweeps_of_one_cell_merged_into_one_folder_stay_one_cell(tmp_path):
    """Seeds 42 and 43 from a sweep with sweep.repeats=2, seed 44 from a later one with sweep.repeats=1: one
    cell of three pairs, not two cells."""
    fake_sweep(tmp_path, {8: [0.10, 0.12, 0.11]})
    for overrides in tmp_path.glob("*/.hydra/overrides.yaml"):
        listed = yaml.safe_load(overrides.read_text())
        repeats = 1 if "train.seed=44" in listed else 2
        overrides.write_text(yaml.safe_dump([*listed, f"sweep.repeats={repeats}"]))
    card = write_report(tmp_path) and (tmp_path / "decision.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| 8")]
    assert len(rows) == 1 and "| QLoRA nf4 | 3 |" in rows[0] and "| worse |" in rows[0]


def curve(*losses: float) -> list[dict]:
    """A learning curve as train.py records it: one evaluation per 100 tokens and 2 s of training."""
    return [{"step": i, "tokens": 100 * i, "train_s": 2.0 * i, "loss": loss} for i, loss in enumerate(losses)]


def test_time_to_target_per_mode_and_not_reached_with_the_best_value(tmp_path):
    # size 8: LoRA ends at 2.0 and 2.2 (target 2.1 · 1.02 = 2.142); QLoRA reaches it one evaluation later
    add_job(tmp_path, 0, "none", 8, 42, 2.0, 10.0, LORA_PEAK, curve=curve(3.0, 2.5, 2.0))
    add_job(tmp_path, 1, "nf4", 8, 42, 2.1, 12.0, QLORA_PEAK, curve=curve(3.0, 2.6, 2.3, 2.1))
    add_job(tmp_path, 2, "none", 8, 43, 2.2, 10.0, LORA_PEAK, curve=curve(3.0, 2.4, 2.2))
    add_job(tmp_path, 3, "nf4", 8, 43, 2.14, 12.0, QLORA_PEAK, curve=curve(3.0, 2.5, 2.14))
    # size 16: QLoRA never gets within 2% of LoRA's 1.0
    add_job(tmp_path, 4, "none", 16, 42, 1.0, 10.0, LORA_PEAK, curve=curve(3.0, 1.0))
    add_job(tmp_path, 5, "nf4", 16, 42, 1.5, 12.0, QLORA_PEAK, curve=curve(3.0, 1.6, 1.5))
    summary = write_report(tmp_path)
    section = summary.split("## Time to target (LoRA's final eval loss + 2%)", 1)[1]
    lora8 = next(line for line in section.splitlines() if line.startswith("| 8 | LoRA |"))
    qlora8 = next(line for line in section.splitlines() if line.startswith("| 8 | QLoRA nf4 |"))
    # LoRA's own seed 43 ends at 2.2, above the target: one of its two runs reaches it (seed 42, at 200
    # tokens)
    assert "| 2.1420 |" in lora8 and "| 1 of 2 |" in lora8 and "| 200 | 4.0 |" in lora8
    tokens, half = interval([300, 200])
    assert "| 2 of 2 |" in qlora8 and f"| {tokens:,.0f} ± {half:,.0f} |" in qlora8
    assert "[1](<1_" in qlora8 and "[3](<3_" in qlora8
    qlora16 = next(line for line in section.splitlines() if line.startswith("| 16 | QLoRA nf4 |"))
    assert "| 1.0200 | not reached (best 1.5000) | – | – |" in qlora16
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def config_for(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from qlora_lab.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config", overrides=["+experiment=lora_vs_qlora", *overrides], return_hydra_config=True
        )


def test_repeats_become_a_seed_axis(tmp_path):
    cfg = config_for(tmp_path, "sweep.repeats=3", "train.seed=7")
    callbacks.SweepReport().on_multirun_start(cfg)
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == {
        "quantization": "none,nf4",
        "dataset.size": "8,16,32",
        "train.seed": "7,8,9",
    }


@pytest.mark.parametrize(
    "repeats, seed_axis, message",
    [
        (0, False, "sweep.repeats must be 1 or more seeds per cell (got 0)."),
        (2, True, "sweep.repeats and a train.seed axis both choose the seeds; give one of them."),
    ],
)
def test_repeats_refused_with_one_sentence(tmp_path, capsys, repeats, seed_axis, message):
    cfg = config_for(tmp_path, f"sweep.repeats={repeats}")
    if seed_axis:
        with open_dict(cfg.hydra):
            cfg.hydra.sweeper.params["train.seed"] = "1,2"
    with pytest.raises(SystemExit) as stop:
        callbacks.SweepReport().on_multirun_start(cfg)
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("axis", ["train.seed=1,2", "train.seed=range(1,3)"])
def test_repeats_refused_beside_a_seed_axis_on_the_command_line(tmp_path, capsys, axis):
    cfg = config_for(tmp_path, "sweep.repeats=2")
    with open_dict(cfg.hydra):  # compose() takes no sweep: as `-m ... train.seed=1,2` records it
        cfg.hydra.overrides.task.append(axis)
    with pytest.raises(SystemExit) as stop:
        callbacks.SweepReport().on_multirun_start(cfg)
    message = "sweep.repeats and a train.seed axis both choose the seeds; give one of them."
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_real_sweep_with_repeats_pairs_by_seed_records_learning_curves_and_verifies(tmp_path, capsys):
    """The one real sweep here: sweep.repeats=2 on the tiny model -> 2 modes x 2 seeds, each LoRA/QLoRA pair
    trained on the same data in the same order, every job with a learning curve, and a card with two pairs."""
    sweep_dir = tmp_path / "sweep"
    # the jobs run in this process (the basic launcher; tests/test_sweep.py runs the experiment's isolated
    # one), and verify re-runs each in a fresh process: the same seed must give the same eval loss either way
    result = run_main(
        "-m",
        "+experiment=lora_vs_qlora",
        "hydra/launcher=basic",
        "model=tiny_random",
        "dataset.size=8",
        "sweep.repeats=2",
        "dataset.eval_size=4",
        "dataset.max_seq_length=64",
        "train.max_steps=2",
        "train.eval_steps=1",
        "train.speed_skip_steps=0",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {}
    for job in sweep_dir.glob("*/metrics.json"):
        cfg = OmegaConf.load(job.parent / ".hydra" / "config.yaml")
        runs[(cfg.quantization.method, cfg.train.seed)] = json.loads(job.read_text())
    assert sorted(runs) == [("nf4", 42), ("nf4", 43), ("none", 42), ("none", 43)]
    for (_, seed), m in runs.items():
        assert [p["step"] for p in m["eval/curve"]] == [0, 1, 2] and m["eval/curve"][-1]["loss"] == m[
            "eval/loss"
        ]
        # same seed: the same batches in the same order, so the same tokens at every evaluation
        assert [p["tokens"] for p in m["eval/curve"]] == [
            p["tokens"] for p in runs[("none", seed)]["eval/curve"]
        ]
    card = (sweep_dir / "decision.md").read_text()
    assert "| 8 | QLoRA nf4 | 2 |" in card and "## Over the seeds" in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "learning_curves.png").is_file() and (sweep_dir / "decision.png").is_file()
    # verify re-runs the cell from the recorded overrides: on CPU the same seed gives the same eval loss,
    # inside the recorded interval (speed and memory on a shared machine may drift: exit 1 is allowed, its
    # table must say so)
    capsys.readouterr()
    code = report_main(["verify", str(sweep_dir), "8"])  # `python -m qlora_lab.report verify SWEEP 8`
    out = capsys.readouterr()
    assert code in (0, 1) and "Re-ran 4 jobs" in out.out, out.err[-3000:]
    for name in ("LoRA", "QLoRA nf4"):
        assert next(
            line for line in out.out.splitlines() if line.startswith(f"| {name} | eval loss |")
        ).endswith("| yes |")
    assert (code == 0) == ("no: drift" not in out.out)
    assert len(list((sweep_dir / "verify").glob("*/*/metrics.json"))) == 4


def test_verify_refuses_a_folder_that_is_not_a_sweep_an_unknown_cell_and_a_cell_that_no_longer_composes(
    tmp_path, capsys
):
    from qlora_lab.report import main

    assert main(["verify", str(tmp_path / "gone")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'gone'} is not a folder; pass a sweep dir (outputs/multirun/<name>/<time>).\n"
    )
    assert main(["verify", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path} is not a sweep: it holds no job folders (none with .hydra/config.yaml).\n"
    )
    fake_sweep(tmp_path, {8: [0.0, 0.0]})
    assert main(["verify", str(tmp_path), "64"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} has no cell '64'; its cells are '8'.\n"
    # a field the schema has since lost (renamed), recorded in every job of the sweep
    for overrides in tmp_path.glob("*/.hydra/overrides.yaml"):
        overrides.write_text(yaml.safe_dump(yaml.safe_load(overrides.read_text()) + ["lora.renamed_field=3"]))
    assert main(["verify", str(tmp_path), "8"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            "error: 0_quantization=none,dataset.size=8,train.seed=42 no longer composes from its "
            "recorded overrides (quantization=none dataset.size=8 train.seed=42 lora.renamed_field=3): "
        )
        and "renamed_field" in err.split(": ", 2)[2]
        and err.count("\n") == 1
    )
    assert not (tmp_path / "verify").exists()  # nothing ran


@pytest.mark.parametrize("shift, inside", [(0.0, True), (0.5, False)])
def test_verify_compares_the_rerun_with_the_recorded_interval(tmp_path, monkeypatch, capsys, shift, inside):
    """The re-run itself is one `python -m qlora_lab` per job (the real one: see the real sweep test); here
    each re-run writes its job folder with the recorded figures, shifted by `shift` in eval loss for QLoRA."""
    from qlora_lab import verify
    from qlora_lab.report import main

    fake_sweep(tmp_path, {8: [0.01, 0.03], 16: [0.0, 0.0]})

    def rerun(job_dir, overrides, out):
        m = json.loads((job_dir / "metrics.json").read_text())
        q = OmegaConf.load(job_dir / ".hydra" / "config.yaml").quantization.method
        shutil.copytree(job_dir, out / job_dir.name)
        m["eval/loss"] += shift if q == "nf4" else 0.0
        (out / job_dir.name / "metrics.json").write_text(json.dumps(m))
        return out / job_dir.name

    monkeypatch.setattr(verify, "rerun", rerun)
    assert main(["verify", str(tmp_path)]) == (0 if inside else 1)  # the smallest cell: 8
    text = capsys.readouterr().out
    assert "cell 8" in text and "Re-ran 4 jobs" in text
    qlora = next(line for line in text.splitlines() if line.startswith("| QLoRA nf4 | eval loss |"))
    assert qlora.endswith("| yes |" if inside else "| no: drift |")
    assert next(line for line in text.splitlines() if line.startswith("| LoRA | eval loss |")).endswith(
        "| yes |"
    )
    assert len(list((tmp_path / "verify").glob("*/verify.md"))) == 1


# ---------------------------------------------------------------- equal memory (sweep.equal_memory)


def add_equal_memory_job(
    sweep_dir,
    num: int,
    size: int,
    seed: int,
    cap: float,
    batch: int,
    peak: float,
    tokens_per_s: float,
    curve_: list | None = None,
    status: str = "completed",
) -> str:
    """The job the equal-memory sweeper adds: the QLoRA job's overrides + batch_size=auto under LoRA's
    peak."""
    name = add_job(sweep_dir, num, "nf4", size, seed, 2.0, 11.0, peak, status=status, curve=curve_)
    extra = ["train.batch_size=auto", f"train.memory_cap_gib={cap}"]
    job = sweep_dir / name
    new = job.with_name(f"{name},{','.join(extra)}")
    job.rename(new)
    (new / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(yaml.safe_load((new / ".hydra" / "overrides.yaml").read_text()) + extra)
    )
    cfg = yaml.safe_load((new / ".hydra" / "config.yaml").read_text())
    cfg["train"] |= {"batch_size": "auto", "memory_cap_gib": cap}
    (new / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = json.loads((new / "metrics.json").read_text()) | {
        "train/batch_size": batch,
        "train/tokens_per_s": tokens_per_s,
    }
    (new / "metrics.json").write_text(json.dumps(m))
    return new.name


def test_equal_memory_jobs_take_the_cap_from_the_lora_job_of_the_same_size_and_seed(tmp_path):
    from types import SimpleNamespace

    from hydra_plugins.qlora_lab_launcher.equal_memory_sweeper import equal_memory_jobs

    def job(name, overrides, peak=None, status="completed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"status": status}))
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({} if peak is None else {"memory/peak_gib": peak})
        )
        return SimpleNamespace(overrides=overrides, working_dir=str(tmp_path / name))

    common = ["model=tiny_random", "train.batch_size=4"]
    jobs = [
        job("0", ["quantization=none", "dataset.size=8", "train.seed=42", *common], peak=1.23456),
        job("1", ["quantization=none", "dataset.size=8", "train.seed=43", *common], peak=1.5),
        job("2", ["quantization=none", "dataset.size=16", "train.seed=42", *common], status="failed"),
        job("3", ["quantization=nf4", "dataset.size=8", "train.seed=42", *common], peak=1.0),
        job("4", ["quantization=nf4", "dataset.size=8", "train.seed=43", *common], peak=1.1),
        job("5", ["quantization=nf4", "dataset.size=16", "train.seed=42", *common], peak=1.1),
    ]
    extra, skipped = equal_memory_jobs(jobs)
    assert extra == [
        [
            "quantization=nf4",
            "dataset.size=8",
            "train.seed=42",
            "model=tiny_random",
            "train.batch_size=auto",
            "train.memory_cap_gib=1.2345",
        ],  # never above LoRA's peak
        [
            "quantization=nf4",
            "dataset.size=8",
            "train.seed=43",
            "model=tiny_random",
            "train.batch_size=auto",
            "train.memory_cap_gib=1.5",
        ],
    ]
    assert skipped == [
        "no equal-memory job for quantization=nf4 dataset.size=16 train.seed=42 model=tiny_random "
        "train.batch_size=4: its LoRA job (quantization=none) did not complete with a measured peak"
    ]


def test_equal_memory_puts_its_sweeper_in_place(tmp_path):
    cfg = config_for(tmp_path, "sweep.equal_memory=true")
    callbacks.SweepReport().on_multirun_start(cfg)
    assert cfg.hydra.sweeper._target_ == callbacks.EQUAL_MEMORY_SWEEPER
    cfg = config_for(tmp_path)
    callbacks.SweepReport().on_multirun_start(cfg)
    assert cfg.hydra.sweeper._target_ == callbacks.BASIC_SWEEPER


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["quantization=nf4"],
            "sweep.equal_memory caps QLoRA at LoRA's measured peak, so the sweep needs both: sweep "
            "quantization=none,nf4 (this sweep runs quantization=nf4 only).",
        ),
        (
            ["hydra/sweeper=optuna"],
            "sweep.equal_memory works with the basic sweeper only (this sweep uses OptunaSweeper).",
        ),
    ],
)
def test_equal_memory_refused_with_one_sentence(tmp_path, capsys, overrides, message):
    cfg = config_for(tmp_path, "sweep.equal_memory=true", *overrides)
    if overrides == ["quantization=nf4"]:  # given on the command line: a single value for the whole sweep
        with open_dict(cfg.hydra):
            del cfg.hydra.sweeper.params["quantization"]
    with pytest.raises(SystemExit) as stop:
        callbacks.SweepReport().on_multirun_start(cfg)
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def equal_memory_sweep(
    sweep_dir, batch: int = 12, losses=(3.0, 2.4, 2.03), gpu: str | None = None
) -> list[str]:
    """Size 8, seeds 42 and 43: LoRA ends at 2.0 (target 2.04, reached at 200 tokens in 4 s); QLoRA at LoRA's
    batch needs 3 evaluations (300 tokens, 6 s); QLoRA at equal memory (`batch` under LoRA's 3.0 GiB, 300 and
    320 tokens/s against LoRA's 100) has the learning curve `losses`, 150 tokens and 1.5 s per evaluation.
    Returns the equal-memory jobs' folder names."""
    num = 0
    for seed in (42, 43):
        add_job(sweep_dir, num, "none", 8, seed, 2.0, 10.0, LORA_PEAK, curve=curve(3.0, 2.5, 2.0))
        add_job(
            sweep_dir,
            num + 1,
            "nf4",
            8,
            seed,
            2.0 + 0.01 * (seed - 42),
            12.0,
            QLORA_PEAK,
            curve=curve(3.0, 2.6, 2.3, 2.02),
        )
        num += 2
    spent = [
        add_equal_memory_job(
            sweep_dir,
            num + i,
            8,
            seed,
            LORA_PEAK,
            batch,
            2.9,
            tps,
            curve_=[
                {"step": s, "tokens": 150 * s, "train_s": 1.5 * s, "loss": loss}
                for s, loss in enumerate(losses)
            ],
        )
        for i, (seed, tps) in enumerate(((42, 300.0), (43, 320.0)))
    ]
    if gpu:
        for info in sweep_dir.glob("*/run.json"):
            info.write_text(
                json.dumps(json.loads(info.read_text()) | {"hardware": {"device": "cuda", "gpu": gpu}})
            )
    return spent


def test_card_gives_throughput_and_time_to_target_at_equal_memory_beside_equal_batch(tmp_path):
    spent = equal_memory_sweep(tmp_path)
    summary = write_report(tmp_path)
    card = (tmp_path / "decision.md").read_text()
    # the equal-memory jobs are neither pairs nor cells of the equal-batch verdict
    assert "| 8 | QLoRA nf4 | 2 |" in next(
        line for line in card.splitlines() if line.startswith("| 8 | QLoRA nf4 | 2")
    )
    assert "### Equal memory: QLoRA spends what it saves on a larger batch" in card
    rows = {
        line.split(" | ")[1]: line
        for line in card.split("### Equal memory", 1)[1].splitlines()
        if line.startswith("| 8 |")
    }
    assert set(rows) == {"LoRA", "QLoRA nf4", "QLoRA nf4 at equal memory"}
    assert rows["LoRA"].startswith(
        "| 8 | LoRA | 4 | 3.00 ± 0.00 | – | 100 ± 0 | 2 of 2 | 200 ± 0 | 4.0 ± 0.0 |"
    )
    assert rows["QLoRA nf4"].startswith(
        "| 8 | QLoRA nf4 | 4 | 2.00 ± 0.00 | – | 100 ± 0 | 2 of 2 | 300 ± 0 | 6.0 ± 0.0 |"
    )
    tps, half = interval([300.0, 320.0])
    assert rows["QLoRA nf4 at equal memory"].startswith(
        f"| 8 | QLoRA nf4 at equal memory | 12 | 2.90 ± 0.00 | 3.00 ± 0.00 | {tps:,.0f} ± {half:,.0f} | 2 of "
        "2 | 300 ± 0 | 3.0 ± 0.0 |"
    )
    assert all(f"(<{name}>)" in rows["QLoRA nf4 at equal memory"] for name in spent)
    # the per-job table names them, in the same group as their QLoRA job
    assert (
        "| 8 (train.seed=42) | QLoRA nf4 at equal memory |"
        in summary.split("## LoRA vs QLoRA per data size", 1)[1]
    )


def test_headline_says_what_the_saved_memory_buys_at_equal_memory_and_that_a_cpu_peak_is_rss(tmp_path):
    equal_memory_sweep(tmp_path)
    write_report(tmp_path)
    first = (tmp_path / "decision.md").read_text().split("![decision]", 1)[0]  # the card's headline
    speed, half = interval([200.0, 220.0])  # 300 and 320 tokens/s against LoRA's 100, per seed
    assert (
        "At equal memory (QLoRA nf4 with train.batch_size=auto under its LoRA job's peak; 2 pairs by data "
        f"size and seed, means ± their 95% interval): batch 12 against LoRA's 4; tokens/s +{speed:.0f}% ± "
        f"{half:.0f}% against LoRA's (+0% ± 0% at LoRA's batch); training seconds to the target (LoRA's "
        "final eval loss + 2%) -25% ± 0% against LoRA's.\n"  # 3 s against LoRA's 4 s, both seeds
    ) in first
    assert (
        "On a CPU the peaks (and the equal-memory cap) are the job process's peak RSS, not GPU memory"
        in first
    )
    rows = report.collect(tmp_path)
    assert decision.plot_title(rows, True).endswith(
        "; equal memory: QLoRA's batch_size=auto under LoRA's peak (CPU: peaks are process RSS, not GPU "
        "memory)"
    )
    assert "equal memory" not in decision.plot_title(rows, False)


def test_headline_at_equal_memory_prints_no_gain_its_data_do_not_show(tmp_path):
    """On a GPU: the equal-memory jobs found no larger batch than LoRA's, and never reached the target."""
    equal_memory_sweep(tmp_path, batch=4, losses=(3.0, 2.6, 2.5), gpu="NVIDIA H200")
    write_report(tmp_path)
    first = (tmp_path / "decision.md").read_text().split("![decision]", 1)[0]
    assert (
        "batch 4 against LoRA's 4 (no larger batch fit, so here its saved memory bought no larger batch)"
        in first
    )
    assert "time to target not compared for 2 of 2 (QLoRA nf4 at equal memory did not reach it)." in first
    assert "training seconds to the target" not in first and "On a CPU" not in first
    assert "CPU" not in decision.plot_title(report.collect(tmp_path), True)


def test_an_equal_memory_job_that_found_no_batch_is_listed_with_its_reason(tmp_path):
    fake_sweep(tmp_path, {8: [0.0, 0.01]})
    name = add_equal_memory_job(tmp_path, 4, 8, 42, LORA_PEAK, 1, 9.0, 1.0, status="failed")
    info = json.loads((tmp_path / name / "run.json").read_text())
    info["error"] = (
        "no batch fits under train.memory_cap_gib=3.0: batch 1 peaked at 9.000 GiB; raise the cap."
    )
    (tmp_path / name / "run.json").write_text(json.dumps(info))
    write_report(tmp_path)
    card = (tmp_path / "decision.md").read_text()
    assert (
        "\n1 equal-memory jobs did not complete: 4: no batch fits under train.memory_cap_gib=3.0: batch 1 "
        "peaked at 9.000 GiB; raise the cap.\n"
    ) in card
    assert "| within noise |" in next(
        line for line in card.splitlines() if line.startswith("| 8 | QLoRA nf4 | 2 |")
    )
    assert (
        "At equal memory: no QLoRA nf4 job completed with train.batch_size=auto under its LoRA job's peak "
        "(see the equal-memory table), so there is nothing to compare."
    ) in card.split("![decision]", 1)[0]


def fake_rerun(monkeypatch, batch: int, device: str | None = None) -> list[list[str]]:
    """verify's re-run replaced: each job folder copied with its recorded figures, an equal-memory job with
    the batch `batch` found, every job recorded on `device` if given. Returns the overrides of every
    re-run."""
    from qlora_lab import verify

    calls = []

    def rerun(job_dir, overrides, out):
        calls.append(overrides)
        shutil.copytree(job_dir, out / job_dir.name)
        if "train.batch_size=auto" in overrides:
            metrics = out / job_dir.name / "metrics.json"
            metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {"train/batch_size": batch}))
        if device:
            (out / job_dir.name / "run.json").write_text(
                json.dumps({"status": "completed", "hardware": {"device": device}})
            )
        return out / job_dir.name

    monkeypatch.setattr(verify, "rerun", rerun)
    return calls


@pytest.mark.parametrize(
    "gpu, batch, code, verdict",
    [
        ("NVIDIA H200", 12, 0, "yes"),
        ("NVIDIA H200", 8, 1, "no: drift"),  # on a GPU another batch under the same cap is drift
        (None, 8, 0, "outside, not counted (CPU: RSS)"),  # on a CPU the cap bounds RSS: shown, not counted
    ],
)
def test_verify_reruns_the_equal_memory_jobs_under_their_recorded_cap(
    tmp_path, monkeypatch, capsys, gpu, batch, code, verdict
):
    from qlora_lab import verify

    equal_memory_sweep(tmp_path, gpu=gpu)
    monkeypatch.setattr(verify, "this_device", lambda: gpu or "cpu")
    calls = fake_rerun(monkeypatch, batch)
    assert report_main(["verify", str(tmp_path), "8"]) == code
    text = capsys.readouterr().out
    assert (
        "Re-ran 6 jobs from their recorded overrides" in text
        and "The 2 equal-memory jobs ran under the cap they recorded (train.memory_cap_gib 3: their LoRA "
        "job's peak in the sweep), not a new measurement."
        in text
    )
    spent = [c for c in calls if "train.batch_size=auto" in c]
    assert len(spent) == 2 and all(c[-1] == f"train.memory_cap_gib={LORA_PEAK}" for c in spent)
    rows = {
        line.split(" | ")[1]: line
        for line in text.splitlines()
        if line.startswith("| QLoRA nf4 at equal memory |")
    }
    assert rows["batch found"] == f"| QLoRA nf4 at equal memory | batch found | 12 | {batch} | {verdict} |"
    # the card's time to target: LoRA's 2.0 + 2% -> 2.04, reached at the third evaluation (300 tokens, 3 s)
    if gpu or batch == 12:
        assert rows["tokens to target"].endswith("| 300 ± 0 | 300 | yes |")
        assert rows["train s to target"].endswith("| 3.0 ± 0.0 | 3.0 | yes |")
    else:  # another batch on a CPU: what followed from it is shown, not counted
        assert rows["eval loss"].endswith("| not counted (CPU: the re-run found another batch) |")
        assert verify.CPU_NOTE in text and "No drift: every counted re-run figure" in text
    # the re-runs under SWEEP_DIR/verify/ are not jobs of the sweep: the report and a second verify leave them
    # out
    assert len(report.collect(tmp_path)) == 6


def test_verify_does_not_rerun_equal_memory_jobs_whose_cap_was_measured_on_another_device(
    tmp_path, monkeypatch, capsys
):
    from qlora_lab import verify

    equal_memory_sweep(tmp_path, gpu="NVIDIA H200")
    monkeypatch.setattr(verify, "this_device", lambda: "cpu")
    calls = fake_rerun(monkeypatch, 12, device="cpu")
    assert report_main(["verify", str(tmp_path), "8"]) == 0
    text = capsys.readouterr().out
    assert "Re-ran 4 jobs" in text and not any("train.batch_size=auto" in c for c in calls)
    assert (
        "The 2 equal-memory jobs are not re-run: their cap is LoRA's peak measured on NVIDIA H200, and on "
        "this "
        "machine (cpu) it would bound another memory, so the batch they find and every figure that follows "
        "from it could not be compared."
    ) in text
    assert (
        "| LoRA | tokens/s | 100 ± 0 | 100 | not compared (recorded on NVIDIA H200, re-run on cpu) |" in text
    )
    assert "| LoRA | eval loss |" in text and "at equal memory" not in text


def test_real_sweep_with_equal_memory_runs_the_capped_job_after_its_lora_job_and_verifies(tmp_path, capsys):
    """sweep.equal_memory=true on the tiny model: LoRA and QLoRA at batch 4, then QLoRA again with
    batch_size=auto under LoRA's measured peak (the CPU process's peak RSS here), launched after both have
    ended; then verify re-runs the three, the equal-memory one under the cap it recorded."""
    sweep_dir = tmp_path / "sweep"
    # launched in this process; the isolated launcher still runs each job in a fresh one (its peak is the
    # job's own)
    result = run_main(
        "-m",
        "+experiment=lora_vs_qlora",
        "model=tiny_random",
        "dataset.size=8",
        "dataset.eval_size=4",
        "dataset.max_seq_length=64",
        "train.max_steps=2",
        "train.eval_steps=1",
        "train.speed_skip_steps=0",
        "sweep.equal_memory=true",
        # QLoRA's batch 4 peaks about at LoRA's (the cap), 5 and 6 above it: two tries over the cap (each
        # larger start is one more, in the sweep and again in verify)
        "train.auto_batch_start=6",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(sweep_dir.glob("*/run.json"), key=lambda p: int(p.parent.name.split("_")[0]))
    assert len(jobs) == 3
    lora, _, spent = [json.loads((j.parent / "metrics.json").read_text()) for j in jobs]
    infos = [json.loads(j.read_text()) for j in jobs]
    assert infos[2]["started_at"] >= max(infos[0]["ended_at"], infos[1]["ended_at"])
    cap = math.floor(lora["memory/train_peak_gib"] * 1e4) / 1e4
    overrides = yaml.safe_load((jobs[2].parent / ".hydra" / "overrides.yaml").read_text())
    assert "quantization=nf4" in overrides and overrides[-2:] == [
        "train.batch_size=auto",
        f"train.memory_cap_gib={cap}",
    ]
    # the batch kept stayed under the cap; every larger one tried went over it
    assert spent["train/memory_cap_gib"] == cap and spent["memory/train_peak_gib"] <= cap
    assert all(
        o["peak_gib"] > cap and o["batch"] > spent["train/batch_size"] for o in spent["train/batch_over_cap"]
    )
    card = (sweep_dir / "decision.md").read_text()
    assert f"| 8 | QLoRA nf4 at equal memory | {spent['train/batch_size']} |" in card
    assert "At equal memory (QLoRA nf4 with train.batch_size=auto under its LoRA job's peak; 1 pair" in card
    from qlora_lab import verify

    capsys.readouterr()
    code = report_main(["verify", str(sweep_dir), "8"])
    out = capsys.readouterr().out
    # tokens/s on a shared CPU may drift: exit 1 is allowed, the table says which figure
    assert code in (0, 1) and "Re-ran 3 jobs" in out and f"(train.memory_cap_gib {cap:g}:" in out, out
    again = next((sweep_dir / "verify").glob("*/2"))  # the equal-memory job's re-run (job number 2)
    assert (
        yaml.safe_load((again / ".hydra" / "overrides.yaml").read_text())[-1] == f"train.memory_cap_gib={cap}"
    )
    assert verify.CPU_NOTE in out
    rows = {
        line.split(" | ")[1]: line
        for line in out.splitlines()
        if line.startswith("| QLoRA nf4 at equal memory |")
    }
    batch = json.loads((again / "metrics.json").read_text())["train/batch_size"]
    assert rows["batch found"].startswith(
        f"| QLoRA nf4 at equal memory | batch found | {spent['train/batch_size']} | {batch} |"
    )
    if batch == spent["train/batch_size"]:  # the same batch and seed: the same eval loss
        _, _, was, now, _ = rows["eval loss"].split(" | ")
        assert was == now == f"{spent['eval/loss']:.4f}"
