"""Hyperparameter search as a sweep: `main` returns the objective, the Optuna sweeper searches, the report
shows it."""

from __future__ import annotations

import csv

import yaml

from .conftest import run_main

# 3 trials of the shipped search on the tiny model. The learning rate is drawn from an interval that crosses
# zero: with the sampler's seed (42) the third trial draws a negative one, which validate() refuses: a failed
# trial.
SEARCH = [
    "-m",
    "+experiment=lr_search",
    "model=tiny_random",
    "quantization=none",
    "hydra/launcher=basic",
    "hydra.sweeper.n_trials=3",
    "lora.r=choice(4,8)",
    "train.learning_rate=interval(-0.004,0.01)",
    "dataset.size=16",
    "dataset.eval_size=4",
    "train.max_steps=2",
    "train.speed_skip_steps=0",
]


def test_optuna_search_reports_trials_best_and_a_failed_trial(tmp_path):
    sweep_dir = tmp_path / "search"
    result = run_main(*SEARCH, f"hydra.sweep.dir={sweep_dir}")
    # every trial ran; the failed one is listed (and makes the exit status 1, as in any sweep), no traceback
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "error: 1 of 3 jobs did not complete" in result.stderr
        and "train.learning_rate must be positive" in result.stderr
    )
    with (sweep_dir / "summary.csv").open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["job"].split("_")[0]))
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    objectives = [float(r["objective"]) for r in rows[:2]]
    assert objectives == [float(r["eval_loss"]) for r in rows[:2]]  # objective.metric: eval/loss
    # the report's best trial is the one with the lowest eval loss, as Optuna found it
    best = min(range(2), key=lambda i: objectives[i])
    optuna = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == objectives[best]
    md = (sweep_dir / "summary.md").read_text()
    assert (
        "## Search (TPESampler): eval/loss, minimize" in md
        and "| trial | status | train.learning_rate | lora.r |" in md
    )
    assert f"| {best} (best) | completed | {optuna['best_params']['train.learning_rate']} |" in md
    assert "| 2 | failed | -" in md and f"Best trial: {best} (" in md
    assert (sweep_dir / "objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
