"""What the web app's Runs and Sweeps pages show, read from the run folders alone (no web framework here).

A run is any Hydra job folder under `paths.output_dir` (one with .hydra/config.yaml), sweep jobs included; the
web app's own job folders are left out. A sweep is a folder holding the report `summary.md`
(qlora_lab/report.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from .config import InferenceMode
from .layout import RunLayout
from .rundir import read_json, run_status

RUN_COLUMNS = [
    "run",
    "started (UTC)",
    "model",
    "quantization",
    "dataset",
    "stages",
    "status",
    "eval loss before",
    "eval loss after",
]


def run_dirs(output_dir: Path) -> list[Path]:
    """Job folders under output_dir, newest first. A job folder holds no other job, so the walk stops at
    one."""
    found = []
    for here, dirs, _ in os.walk(output_dir):
        if RunLayout(here).config.is_file():
            found.append(Path(here))
            dirs[:] = []
        else:
            dirs.sort()
    runs = [d for d in found if _stages(d) != ["web"]]
    return sorted(runs, key=lambda d: _started(d), reverse=True)


def _stages(run_dir: Path) -> list[str]:
    stages = OmegaConf.select(OmegaConf.load(RunLayout(run_dir).config), "pipeline.stages", default=[])
    return list(stages or [])


def _started(run_dir: Path) -> str:
    """run.json's start time, else the folder's modification time: ISO, in UTC."""
    started = read_json(RunLayout(run_dir).run_json).get("started_at")
    try:
        when = datetime.fromisoformat(started)
    except (TypeError, ValueError):
        when = datetime.fromtimestamp(run_dir.stat().st_mtime, timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "–"


def run_row(run_dir: Path, output_dir: Path) -> dict:
    cfg = OmegaConf.load(RunLayout(run_dir).config)
    info, metrics = read_json(RunLayout(run_dir).run_json), read_json(RunLayout(run_dir).metrics_json)
    status, error = run_status(info) if info else ("no run.json", "")
    dataset = OmegaConf.select(cfg, "dataset.name", default="?")
    size = OmegaConf.select(cfg, "dataset.size", default=None)
    return {
        "run": run_dir.relative_to(output_dir).as_posix(),
        "started (UTC)": _started(run_dir).replace("T", " ")[:16],
        "model": OmegaConf.select(cfg, "model.name_or_path", default="?"),
        "quantization": str(OmegaConf.select(cfg, "quantization.method", default="?")),
        "dataset": f"{dataset} ({size})" if size is not None else str(dataset),
        "stages": ",".join(_stages(run_dir)),
        "status": f"{status}: {error}" if error and status != "completed" else str(status),
        "eval loss before": _loss(metrics.get("eval/loss_before")),
        "eval loss after": _loss(metrics.get("eval/loss")),
    }


def runs_table(output_dir: str | Path) -> list[dict]:
    """One row per run under output_dir (RUN_COLUMNS), newest first; [] when the folder does not exist yet."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [run_row(d, output_dir) for d in run_dirs(output_dir)]


def inference_modes(run_dir: Path | None) -> list[str]:
    """The inference modes a run has the files for (base always: it needs no run)."""
    from .inference_modes import MODES

    if run_dir is None:
        return [InferenceMode.base.value]
    return [spec.mode.value for spec in MODES.values() if spec.available(run_dir)]


# ---------------------------------------------------------------- one run


def shell_arg(key: str, path: Path | str) -> str:
    """`key=path` for a command line, pasteable into a shell, quoted for Hydra where the path has characters
    its override grammar reads (a sweep job folder like `3_+experiment=x,dataset.size=16`)."""
    value = str(path)
    if re.search(r"[^\w./-]", value):
        value = "'" + value.replace("'", "\\'") + "'"
    arg = f"{key}={value}"
    if re.fullmatch(r"[\w./=-]+", arg):
        return arg
    return (
        f'"{arg}"' if not re.search(r'["$`\\!]', arg) else shlex.quote(arg)
    )  # "..." keeps Hydra's quotes readable


def loss_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "eval": [(step, loss)]}: the Trainer's log history, with the final eval loss
    of metrics.json (measured after the last checkpoint was saved) as the last eval point."""
    history = _logged_losses(run_dir)
    metrics = read_json(RunLayout(run_dir).metrics_json)
    steps, final = metrics.get("train/steps"), metrics.get("eval/loss")
    if (
        history["train"]
        and steps is not None
        and final is not None
        and (not history["eval"] or history["eval"][-1][0] < steps)
    ):
        history["eval"].append((steps, final))
    return history


def _logged_losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The newest checkpoint's trainer_state.json, else the TensorBoard event files; empty lists without
    either."""
    states = sorted(
        run_dir.glob("checkpoints/checkpoint-*/trainer_state.json"),
        key=lambda p: (
            int(p.parent.name.rsplit("-", 1)[-1]) if p.parent.name.rsplit("-", 1)[-1].isdigit() else -1
        ),
    )
    if states:
        history = json.loads(states[-1].read_text()).get("log_history", [])
        return {
            "train": [(h["step"], h["loss"]) for h in history if "loss" in h],
            "eval": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
        }
    if RunLayout(run_dir).tensorboard.is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(RunLayout(run_dir).tensorboard)).Reload()
        tags = set(events.Tags().get("scalars", []))
        return {
            name: [(e.step, e.value) for e in events.Scalars(tag)] if tag in tags else []
            for name, tag in (("train", "train/loss"), ("eval", "eval/loss"))
        }
    return {"train": [], "eval": []}


def loss_figure(history: dict[str, list[tuple[int, float]]], title: str):
    """A matplotlib figure of the train and eval loss against the step, or None without any point."""
    if not history["train"] and not history["eval"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    if history["train"]:
        ax.plot(*zip(*history["train"], strict=True), label="train loss")
    if history["eval"]:
        ax.plot(*zip(*history["eval"], strict=True), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plt.close(fig)  # kept by the caller, not by pyplot's list of open figures
    return fig


def run_details(run_dir: Path) -> dict:
    """config (YAML text), metrics (dict), evaluation (markdown) and history (loss_history) of one run."""
    config = RunLayout(run_dir).config
    evaluation = RunLayout(run_dir).evaluation_md
    return {
        "config": config.read_text() if config.is_file() else "",
        "metrics": read_json(RunLayout(run_dir).metrics_json),
        "evaluation": evaluation.read_text()
        if evaluation.is_file()
        else "No evaluation table yet: `python -m qlora_lab pipeline=evaluate "
        f"{shell_arg('run_dir', run_dir)}` writes one.",
        "history": loss_history(run_dir),
    }


# ---------------------------------------------------------------- sweeps


def sweep_dirs(output_dir: str | Path) -> list[Path]:
    """Folders under output_dir that hold a sweep report (summary.md), newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(
        (p.parent for p in output_dir.rglob("summary.md")), key=lambda p: p.stat().st_mtime, reverse=True
    )


CARD, CARD_PLOT = "decision.md", "decision.png"  # qlora_lab/report.py writes them next to summary.md
_JOB_LINK = re.compile(r"\[(\d+)\]\(<[^>]*>\)")  # the card's `[3](<3_quantization=nf4,...>)`: a job folder


def _inside(sweep_dir: Path, name: str) -> Path | None:
    """The sweep's own file `name`, or None: a link that leads out of the sweep folder is not shown."""
    path = sweep_dir / name
    return path if path.is_file() and path.resolve().is_relative_to(sweep_dir.resolve()) else None


def sweep_page(sweep_dir: Path) -> dict:
    """The decision card (decision.md as the page shows it, and decision.png) when the sweep has one,
    summary.md less the card (shown once, on top), and the report's other PNG plots. Only files inside the
    sweep folder."""
    summary = (sweep_dir / "summary.md").read_text()
    card_file = _inside(sweep_dir, CARD)
    card = None
    if card_file:
        # the page cannot open the job folders the card links to: it names them by job number (the Runs page
        # lists them as <sweep>/<number>_...), and shows the card's PNG beside the text
        lines = [
            line
            for line in card_file.read_text().splitlines()
            if not line.startswith(f"![decision]({CARD_PLOT})")
        ]
        card = _JOB_LINK.sub(r"`\1`", "\n".join(lines))
        head, found, rest = summary.partition("## Decision: LoRA vs QLoRA")
        if found:
            summary = head + ("## " + rest.split("\n## ", 1)[1] if "\n## " in rest else "")
    plots = [p for p in sorted(sweep_dir.glob("*.png")) if _inside(sweep_dir, p.name)]
    card_plot = _inside(sweep_dir, CARD_PLOT) if card else None
    return {
        "card": card,
        "card_plot": card_plot,
        "summary": summary,
        "plots": [p for p in plots if p != card_plot],
    }
