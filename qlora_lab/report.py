"""Sweep report: every job of a multirun -> summary.csv, summary.md (LoRA vs QLoRA per data size) and plots;
for a hyperparameter search (hydra/sweeper=optuna) also every trial's parameters and objective, the best trial
and objective.png.

    python -m qlora_lab.report outputs/multirun/lora_vs_qlora/<time>  # (re)write the report of a sweep
    python -m qlora_lab.report verify SWEEP_DIR [CELL]  # re-run one cell, check it against its intervals

The SweepReport Hydra callback (qlora_lab/callbacks.py) calls `write_report` when a multirun ends. Each job is
read from its own folder only (.hydra/config.yaml, .hydra/overrides.yaml, run.json, metrics.json), so the
report can be rebuilt at any time, and a failed job shows up as failed with its error next to the others.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from . import decision
from .config import ConfigError
from .layout import RunLayout
from .rundir import override_values, read_json, run_status

SUMMARY_FILES = [
    "summary.csv",
    "summary.md",
    "decision.md",
    "time_vs_size.png",
    "peak_memory.png",
    "eval_loss.png",
]
DECISION_PLOT = decision.DECISION_PLOT  # sweeps with LoRA/QLoRA pairs only
CURVES_PLOT = decision.CURVES_PLOT  # jobs that recorded eval/curve only
SEARCH_PLOT = "objective.png"  # Optuna sweeps only

# summary.csv column -> metrics.json key
METRICS = {
    "wall_s": "time/wall_s",
    "train_s": "train/runtime_s",
    "tokens_per_s": "train/tokens_per_s",
    "samples_per_s": "train/samples_per_s",
    "step_time_median_s": "train/step_time_median_s",
    "train_steps": "train/steps",
    "timed_steps": "train/timed_steps",
    "train_examples": "data/train_examples",
    "train_tokens": "data/train_tokens",
    "peak_gib": "memory/peak_gib",
    "peak_reserved_gib": "memory/peak_reserved_gib",
    "load_s": "model/load_s",
    "footprint_gib": "model/footprint_gib",
    "train_loss": "train/loss",
    "train_loss_last": "train/loss_last",
    "eval_loss_before": "eval/loss_before",
    "eval_loss": "eval/loss",
    "trainable_params": "params/trainable",
    "batch_size_used": "train/batch_size",
    "tokens_per_s_per_gpu": "train/tokens_per_s_per_gpu",
    "step_time_min_s": "train/step_time_min_s",
    "step_time_max_s": "train/step_time_max_s",
    "mfu": "perf/mfu",
    "flops_per_token": "perf/flops_per_token",
    "peak_tflops": "perf/peak_tflops",
    # quality: eval/perplexity comes from the train stage too; the rest from the evaluate stage, if the sweep
    # runs it
    "eval_perplexity": "eval/perplexity",
    "eval_rougeL": "eval/rougeL",
    "eval_bleu4": "eval/bleu4",
    "eval_accuracy": "eval/accuracy",
    "base_perplexity": "eval_base/perplexity",
    "base_accuracy": "eval_base/accuracy",
}
QUALITY = [
    ("eval_perplexity", "perplexity"),
    ("base_perplexity", "base perplexity"),
    ("eval_rougeL", "ROUGE-L"),
    ("eval_bleu4", "BLEU-4"),
    ("eval_accuracy", "accuracy"),
    ("base_accuracy", "base accuracy"),
]
# Each job compared with the LoRA job (quantization=none) that differs from it only in quantization.
RATIOS = ["time_ratio", "lora_speedup", "memory_ratio"]
COLUMNS = [
    "job",
    "status",
    "error",
    "group",
    "recipe",
    "quantization",
    "lora",
    "dataset_size",
    "model",
    "max_seq_length",
    "pack",
    "batch_size",
    "memory_cap_gib",
    "grad_accum",
    "gradient_checkpointing",
    "seed",
    "data_seed",
    "device",
    "objective",
    *METRICS,
    *RATIOS,
]
RATIO_NOTE = (
    "wall s: the job from its start to its end (data, model load, evaluation before and after, training, "
    "saving; not the process start-up); "
    "train s: the training loop; weights GiB: the loaded base model (`get_memory_footprint`). "
    "time ÷ LoRA: this job's wall time ÷ the LoRA job's. LoRA speed-up: LoRA's tokens/s ÷ this job's "
    "(above 1: LoRA trains faster). memory ÷ LoRA: this job's peak memory ÷ the LoRA job's (below 1: "
    "it needs less). Peak memory is `torch.cuda.max_memory_allocated` on a GPU, the job process's peak "
    "RSS on a CPU, up to the end of training where the job trained (a later evaluate stage is left out); "
    "tokens/s counts real (non-padding) tokens over the timed steps (warm-up left out)."
)


# ---------------------------------------------------------------- reading the jobs


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders (those Hydra wrote a config into), in job-number order. Also found below the top level: a
    hydra.sweep.subdir with a '/' in it (or a sweep from before job_dirname) nests them. The re-runs of
    `verify` (SWEEP_DIR/verify/) are not jobs of the sweep."""
    dirs = [
        p.parent.parent
        for p in sweep_dir.glob("**/.hydra/config.yaml")
        if p.parent.parent != sweep_dir and p.relative_to(sweep_dir).parts[0] != "verify"
    ]

    def number(p: Path) -> int:
        first = p.relative_to(sweep_dir).parts[0].split("_", 1)[0]
        return int(first) if first.isdigit() else 1 << 30

    return sorted(dirs, key=lambda p: (number(p), str(p)))


def _overrides(job_dir: Path) -> dict[str, str]:
    path = RunLayout(job_dir).overrides
    return override_values([str(o) for o in OmegaConf.load(path)]) if path.is_file() else {}


def job_row(job_dir: Path) -> dict:
    cfg = OmegaConf.load(RunLayout(job_dir).config)
    info, metrics = read_json(RunLayout(job_dir).run_json), read_json(RunLayout(job_dir).metrics_json)
    status, error = run_status(info)  # a `running` record whose process is gone is `died`
    if status is None:
        status, error = (
            "failed",
            "no run.json: the job stopped before its config was composed (see its __main__.log)",
        )
    hardware = info.get("hardware", {})
    row = {
        "job": job_dir.name,
        "status": status,
        "error": error,
        "quantization": str(OmegaConf.select(cfg, "quantization.method")),
        "lora": lora_label(cfg),
        "recipe": OmegaConf.select(
            cfg, "recipe", default="paper"
        ),  # runs from before recipes existed: the paper's
        "dataset_size": OmegaConf.select(cfg, "dataset.size"),
        "model": OmegaConf.select(cfg, "model.name_or_path"),
        "dataset": OmegaConf.select(cfg, "dataset.name"),
        "max_seq_length": OmegaConf.select(cfg, "dataset.max_seq_length"),
        "pack": OmegaConf.select(cfg, "dataset.pack", default=False),
        "batch_size": OmegaConf.select(cfg, "train.batch_size"),
        "grad_accum": OmegaConf.select(cfg, "train.grad_accum"),
        # sweep.equal_memory's jobs: QLoRA with batch_size=auto under LoRA's measured peak
        # (qlora_lab/decision.py)
        "memory_cap_gib": OmegaConf.select(cfg, "train.memory_cap_gib", default=None),
        "gradient_checkpointing": OmegaConf.select(cfg, "train.gradient_checkpointing"),
        "seed": OmegaConf.select(cfg, "train.seed"),
        "data_seed": OmegaConf.select(cfg, "dataset.seed"),
        "device": hardware.get("gpu") or hardware.get("device", ""),
    }
    row |= {column: metrics.get(key) for column, key in METRICS.items()}
    # a job that trained and then evaluated or merged: its training's peak is the one to compare
    row["peak_gib"] = metrics.get("memory/train_peak_gib", row["peak_gib"])
    # what `python -m qlora_lab` returned: the number a search optimizes (objective.metric, eval/loss by
    # default)
    row["objective"] = metrics.get(OmegaConf.select(cfg, "objective.metric", default="eval/loss"))
    row["_direction"] = OmegaConf.select(cfg, "objective.direction", default="minimize")
    row["_overrides"] = _overrides(job_dir)
    row["_curve"] = metrics.get("eval/curve") or []  # [{step, tokens, train_s, loss}]: qlora_lab/decision.py
    row["_info"] = info
    row["equal_memory"] = row["memory_cap_gib"] is not None
    # whether the cap chose the batch: the batches tried over it, and the first one the search tried
    row["_batch_over_cap"] = metrics.get("train/batch_over_cap") or []
    row["_auto_batch_start"] = OmegaConf.select(cfg, "train.auto_batch_start", default=None)
    return row


def lora_label(cfg) -> str:
    """The adapter a job trained, e.g. `LoRA r16`, `DoRA r16`, `rsLoRA r64`, `LoRA r16, loftq init`."""

    def value(key: str, default):
        found = OmegaConf.select(cfg, key, default=default)
        return getattr(found, "value", found)  # an enum member in a composed config, its name in a saved one

    if value("lora.r", None) is None:  # a job folder whose config has no lora group
        return "-"
    rslora, dora = value("lora.rslora", False), value("lora.variant", "lora") == "dora"
    name = ("rsDoRA" if rslora else "DoRA") if dora else "rsLoRA" if rslora else "LoRA"
    init = value("lora.init", "default")
    return f"{name} r{OmegaConf.select(cfg, 'lora.r')}" + ("" if init == "default" else f", {init} init")


def variants(done: list[dict]) -> list[str]:
    """Quality, time and memory per adapter variant, each against the plain LoRA job (quantization=none) of
    the same data size and seed; only for sweeps whose jobs train different adapters."""
    if len({(r["quantization"], r["lora"]) for r in done}) < 2 or len({r["lora"] for r in done}) < 2:
        return []
    lines = [
        "",
        "## LoRA variants",
        "",
        "| data size | seed | mode | adapter | trainable | eval loss before | eval loss | perplexity | wall "
        "s | train s | tokens/s | peak GiB | time ÷ LoRA | memory ÷ LoRA |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    plain = lambda b: b["lora"].startswith("LoRA r") and "," not in b["lora"]  # noqa: E731 (no DoRA, rsLoRA, init)
    for r in done:
        lora = next(
            (
                b
                for b in done
                if b["quantization"] == "none"
                and plain(b)
                and (b["dataset_size"], b["seed"]) == (r["dataset_size"], r["seed"])
            ),
            None,
        )
        time_ratio = _ratio(r["wall_s"], lora["wall_s"]) if lora else None
        memory_ratio = _ratio(r["peak_gib"], lora["peak_gib"]) if lora else None
        lines.append(
            f"| {r['dataset_size'] or 'all'} | {r['seed']} | {_mode(r['quantization'])} | {r['lora']} "
            f"| {_fmt(r['trainable_params'], 0, True)} | {_fmt(r['eval_loss_before'], 4)} "
            f"| {_fmt(r['eval_loss'], 4)} | {_fmt(r['eval_perplexity'])} | {_fmt(r['wall_s'], 1)} "
            f"| {_fmt(r['train_s'], 1)} | {_fmt(r['tokens_per_s'], 0, True)} | {_fmt(r['peak_gib'])} "
            f"| {_fmt(time_ratio)} | {_fmt(memory_ratio)} |"
        )
    lines += [
        "",
        "eval loss before: the model as the adapter starts (LoftQ's start is not the quantized base); "
        "time and memory ÷ LoRA: against the plain LoRA job of the same data size and seed.",
    ]
    return lines


def search_settings(sweep_dir: Path) -> dict | None:
    """The Optuna sweeper's settings as a job recorded them (.hydra/hydra.yaml); None for any other
    sweeper."""
    for job_dir in job_dirs(sweep_dir):
        path = RunLayout(job_dir).hydra_yaml
        if path.is_file():
            sweeper = OmegaConf.load(path).hydra.sweeper
            if "optuna" not in str(sweeper.get("_target_", "")):
                return None
            return {
                "params": list(sweeper.get("params") or {}),
                "sampler": str(sweeper.sampler._target_).split(".")[-1],
            }
    return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def add_groups_and_ratios(rows: list[dict]) -> None:
    """Group jobs that differ only in quantization; compare each with its group's LoRA job. An equal-memory
    job joins the group of its QLoRA job (its batch and cap are what it measures, not a setting of the
    cell)."""
    base = [r for r in rows if not r.get("equal_memory")] or rows
    keys = {k for r in base for k in r["_overrides"]}
    # sweep.repeats says how many seeds a sweep ran, not what a job trained: sweeps of one cell merged into
    # one folder (seeds run in different calls) stay one cell
    varying = sorted(
        k
        for k in keys - {"quantization", "dataset.size", "train.memory_cap_gib", "sweep.repeats"}
        if len({r["_overrides"].get(k) for r in base}) > 1
    )
    for r in rows:
        size = "all" if r["dataset_size"] is None else str(r["dataset_size"])
        for key, keys in (("group", varying), ("cell", [k for k in varying if k != "train.seed"])):
            others = ", ".join(f"{k}={r['_overrides'].get(k)}" for k in keys)
            r[key] = f"{size} ({others})" if others else size
    for r in rows:
        lora = next(
            (
                b
                for b in rows
                if b["group"] == r["group"] and b["quantization"] == "none" and b["status"] == "completed"
            ),
            None,
        )
        ok = lora is not None and r["status"] == "completed"
        r["time_ratio"] = _ratio(r["wall_s"], lora["wall_s"]) if ok else None
        r["lora_speedup"] = _ratio(lora["tokens_per_s"], r["tokens_per_s"]) if ok else None
        r["memory_ratio"] = _ratio(r["peak_gib"], lora["peak_gib"]) if ok else None


def collect(sweep_dir: Path) -> list[dict]:
    rows = [job_row(d) | {"job": str(d.relative_to(sweep_dir))} for d in job_dirs(sweep_dir)]
    add_groups_and_ratios(rows)
    return rows


# ---------------------------------------------------------------- writing


def _mode(quantization: str, row: dict | None = None) -> str:
    return decision.mode(quantization) + (" at equal memory" if row and row.get("equal_memory") else "")


def _order(rows: list[dict]) -> list[dict]:
    """By data size, then LoRA first and the quantized modes after it."""
    size = lambda r: (r["dataset_size"] is None, r["dataset_size"] or 0)  # noqa: E731
    return sorted(
        rows,
        key=lambda r: (
            *size(r),
            r["group"],
            r["quantization"] != "none",
            r["quantization"],
            r.get("equal_memory", False),
        ),
    )


def _fmt(value, digits: int = 2, thousands: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def markdown_table(rows: list[dict], columns: list[str], header: str) -> str:
    """A header line, then one markdown row per dict over `columns` (3 significant digits, "-" for
    missing)."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict], sweep_dir: Path, target_gap: float = decision.TARGET_GAP) -> str:
    done = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] != "completed"]
    first = (done or rows)[0]["_info"] if rows else {}
    hw, versions = first.get("hardware", {}), first.get("versions", {})
    hardware = (
        f"{hw.get('gpu')} ({hw.get('gpu_memory_gib')} GiB)"
        if hw.get("gpu")
        else f"CPU, {hw.get('cpu_count')} cores"
        if hw
        else "unknown"
    )
    models = ", ".join(sorted({str(r["model"]) for r in rows}))
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"`{sweep_dir}`: {len(rows)} jobs, {len(done)} completed, {len(failed)} failed. Model: {models}. "
        f"Hardware: {hardware}. torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
        f"peft {versions.get('peft')}, bitsandbytes {versions.get('bitsandbytes')}.",
        "",
        *decision.card(rows).splitlines(),
        "",
        *decision.repeats_section(rows),
        *decision.target_section(rows, target_gap),
        "## LoRA vs QLoRA per data size",
        "",
        "| data size | mode | steps | wall s | train s | tokens/s | weights GiB | peak GiB | eval loss | "
        "time ÷ LoRA | LoRA speed-up | memory ÷ LoRA |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in _order(done):
        lines.append(
            f"| {r['group']} | {_mode(r['quantization'], r)} | {r['train_steps'] or '–'} | "
            f"{_fmt(r['wall_s'], 1)} | {_fmt(r['train_s'], 1)} | {_fmt(r['tokens_per_s'], 0, True)} | "
            f"{_fmt(r['footprint_gib'])} | {_fmt(r['peak_gib'])} "
            f"| {_fmt(r['eval_loss'], 4)} | {_fmt(r['time_ratio'])} | {_fmt(r['lora_speedup'])} "
            f"| {_fmt(r['memory_ratio'])} |"
        )
    lines += ["", RATIO_NOTE]
    lines += performance(done)
    quality = [(col, label) for col, label in QUALITY if any(r[col] is not None for r in done)]
    if quality:
        lines += [
            "",
            "## Quality",
            "",
            "| data size | mode | " + " | ".join(label for _, label in quality) + " |",
            "| --- | --- |" + " ---: |" * len(quality),
        ]
        lines += [
            f"| {r['group']} | {_mode(r['quantization'], r)} | "
            + " | ".join(_fmt(r[c]) for c, _ in quality)
            + " |"
            for r in _order(done)
        ]
    lines += variants(done)
    if failed:
        lines += ["", "## Failed jobs", "", "| job | error |", "| --- | --- |"]
        lines += [
            f"| {r['job']} | {str(r['error']).replace('|', '/').splitlines()[0] if r['error'] else '?'} |"
            for r in failed
        ]
    extra = ", `decision.png`" if decision.has_pairs(rows) else ""
    extra += ", `learning_curves.png`" if any(r["_curve"] for r in done) else ""
    lines += [
        "",
        f"Plots: `time_vs_size.png`, `peak_memory.png`, `eval_loss.png`{extra}. Every job: `summary.csv`.",
        "",
    ]
    return "\n".join(lines)


def trial_number(row: dict) -> int:
    return int(row["job"].split("_", 1)[0])


def best_trial(rows: list[dict]) -> dict | None:
    scored = [r for r in rows if r["status"] == "completed" and r["objective"] is not None]
    if not scored:
        return None
    pick = max if scored[0]["_direction"] == "maximize" else min
    return pick(scored, key=lambda r: r["objective"])


def search_params(rows: list[dict], settings: dict) -> list[str]:
    """The searched parameters: the sweeper's params, and any other override that differs between trials."""
    keys = {k for r in rows for k in r["_overrides"]}
    varying = [k for k in sorted(keys) if len({r["_overrides"].get(k) for r in rows}) > 1]
    return list(dict.fromkeys([k for k in settings["params"] if k in keys] + varying))


def search_section(rows: list[dict], settings: dict, metric: str) -> list[str]:
    """An Optuna search: every trial with its parameters and objective (a failed trial as failed), and the
    best."""
    params = search_params(rows, settings)
    best = best_trial(rows)
    direction = rows[0]["_direction"]
    lines = [
        f"## Search ({settings['sampler']}): {metric}, {direction}",
        "",
        "| trial | status | " + " | ".join(params) + f" | {metric} |",
        "| ---: | --- |" + " --- |" * len(params) + " ---: |",
    ]
    for r in sorted(rows, key=trial_number):
        mark = " (best)" if r is best else ""
        lines.append(
            f"| {trial_number(r)}{mark} | {r['status']} | "
            + " | ".join(str(r["_overrides"].get(p, "–")) for p in params)
            + f" | {_fmt(r['objective'], 4)} |"
        )
    if best is None:
        lines += ["", "No trial completed with an objective: no best trial."]
    else:
        chosen = ", ".join(f"{p}={best['_overrides'].get(p)}" for p in params)
        lines += [
            "",
            f"Best trial: {trial_number(best)} ({chosen}): {metric} = {best['objective']:.4f}. "
            f"Objective over the trials: `{SEARCH_PLOT}`.",
        ]
    return lines + [""]


def performance(done: list[dict]) -> list[str]:
    """Throughput with its spread, MFU and both memory peaks; and, when the sweep ran both recipes, what the
    fast recipe buys over the paper's for each mode."""
    if not any(r["step_time_median_s"] for r in done):
        return []
    lines = [
        "",
        "## Performance",
        "",
        "| data size | mode | batch | tokens/s per GPU | step s (min / median / max) | MFU | peak allocated "
        "GiB | peak reserved GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in _order(done):
        spread = " / ".join(
            _fmt(r[k], 3) for k in ("step_time_min_s", "step_time_median_s", "step_time_max_s")
        )
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "–"
        lines.append(
            f"| {r['group']} | {_mode(r['quantization'], r)} | {r['batch_size_used'] or r['batch_size']} "
            f"| {_fmt(r['tokens_per_s_per_gpu'], 0, True)} | {spread} | {mfu} | {_fmt(r['peak_gib'])} "
            f"| {_fmt(r['peak_reserved_gib'])} |"
        )
    peak = next((r["peak_tflops"] for r in done if r["peak_tflops"]), None)
    lines += [
        "",
        "MFU = tokens/s per GPU × model FLOPs per token ÷ the GPU's peak dense bf16 FLOP/s"
        + (f" ({peak:,.1f} TFLOP/s, the datasheet figure)" if peak else " (unknown here: no MFU)")
        + ". FLOPs per token = 4·N + 6·N_lora + 12·L·d·c (frozen matmul weights N need no weight gradient; "
        "c = mean attended tokens), recomputation not counted: see `qlora_lab/perf.py`.",
    ]
    recipes = {r["recipe"] for r in done}
    if {"paper", "fast"} <= recipes:
        lines += [
            "",
            "## What the fast recipe buys (fast ÷ paper, same mode and data size)",
            "",
            "| data size | mode | paper tokens/s | fast tokens/s | speed-up | paper peak GiB | fast peak GiB "
            "|",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in _order([r for r in done if r["recipe"] == "fast"]):
            paper = next(
                (
                    p
                    for p in done
                    if p["recipe"] == "paper"
                    and p["quantization"] == r["quantization"]
                    and p["group"] == r["group"].replace("recipe=fast", "recipe=paper")
                ),
                None,
            )
            if paper:
                lines.append(
                    f"| {r['group']} | {_mode(r['quantization'], r)} | "
                    f"{_fmt(paper['tokens_per_s'], 0, True)} "
                    f"| {_fmt(r['tokens_per_s'], 0, True)} | "
                    f"{_fmt(_ratio(r['tokens_per_s'], paper['tokens_per_s']))} | {_fmt(paper['peak_gib'])} | "
                    f"{_fmt(r['peak_gib'])} |"
                )
    return lines


def plots(rows: list[dict], sweep_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    done = [r for r in _order(rows) if r["status"] == "completed"]
    series: dict[str, list[dict]] = {}
    for r in done:
        other = r["group"].partition(" (")[2].rstrip(")")
        series.setdefault(_mode(r["quantization"], r) + (f" ({other})" if other else ""), []).append(r)

    def x(r):
        return r["dataset_size"] if r["dataset_size"] is not None else r["train_examples"]

    def panel(ax, key: str, ylabel: str) -> None:
        for label, rs in series.items():
            pts = [(x(r), r[key]) for r in rs if r[key] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if key != "eval_loss":
            ax.set_ylim(bottom=0)  # time and memory from zero, so that the gap between modes reads true
        ax.set_xlabel("training examples (dataset.size)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    panel(a, "wall_s", "job wall time (s)")
    panel(b, "tokens_per_s", "training tokens/s")
    fig.suptitle("Time vs data size")
    fig.tight_layout()
    fig.savefig(sweep_dir / "time_vs_size.png", dpi=110)
    for key, ylabel, name, title in (
        ("peak_gib", "peak memory (GiB)", "peak_memory.png", "Peak memory"),
        ("eval_loss", "eval loss", "eval_loss.png", "Eval loss after training"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        panel(ax, key, ylabel)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(sweep_dir / name, dpi=110)
    plt.close("all")


def search_plot(rows: list[dict], sweep_dir: Path, metric: str) -> None:
    """The objective of each trial in trial order, the best so far as a step line, failed trials as
    crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ordered = sorted(rows, key=trial_number)
    done = [
        (trial_number(r), r["objective"])
        for r in ordered
        if r["status"] == "completed" and r["objective"] is not None
    ]
    failed = [trial_number(r) for r in ordered if r["status"] != "completed" or r["objective"] is None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if done:
        pick = max if rows[0]["_direction"] == "maximize" else min
        best_so_far = [pick(v for _, v in done[: i + 1]) for i in range(len(done))]
        ax.plot([t for t, _ in done], [v for _, v in done], "o", label="trial")
        ax.step([t for t, _ in done], best_so_far, where="post", label="best so far")
    if failed:
        y = min(v for _, v in done) if done else 0.0
        ax.plot(failed, [y] * len(failed), "x", color="red", label="failed")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("Objective over the trials")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(sweep_dir / SEARCH_PLOT, dpi=110)
    plt.close(fig)


def write_report(sweep_dir: str | Path) -> str:
    """Write summary.csv, summary.md and the plots into the sweep dir; return the markdown."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} is not a folder; pass a sweep dir (outputs/multirun/<name>/<time>).")
    rows = collect(sweep_dir)
    if not rows:
        raise ConfigError(
            f"{sweep_dir} holds no Hydra job folders (none with .hydra/config.yaml); pass the sweep "
            f"dir of a `python -m qlora_lab -m ...` run."
        )
    write_csv(rows, sweep_dir / "summary.csv")
    text = markdown(rows, sweep_dir)
    settings = search_settings(sweep_dir)
    if settings:
        metric = OmegaConf.select(
            OmegaConf.load(RunLayout(job_dirs(sweep_dir)[0]).config), "objective.metric", default="eval/loss"
        )
        head, _, rest = text.partition("\n## ")
        text = head + "\n" + "\n".join(search_section(rows, settings, metric)) + "\n## " + rest
        search_plot(rows, sweep_dir, metric)
    (sweep_dir / "summary.md").write_text(text)
    (sweep_dir / "decision.md").write_text(
        f"# Decision: {sweep_dir.name}\n\n" + decision.card(rows).partition("\n")[2]
    )
    decision.plot(rows, sweep_dir / DECISION_PLOT)
    decision.curves_plot(rows, sweep_dir / CURVES_PLOT)
    plots(rows, sweep_dir)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        from .verify import main as verify_main

        return verify_main(argv[1:])
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m qlora_lab.report SWEEP_DIR   (re)writes " + ", ".join(SUMMARY_FILES) + " there",
            file=sys.stderr,
        )
        return 2
    try:
        text = write_report(argv[0])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    files = SUMMARY_FILES + [
        p for p in (DECISION_PLOT, CURVES_PLOT, SEARCH_PLOT) if (Path(argv[0]) / p).is_file()
    ]
    print(f"wrote {', '.join(files)} in {argv[0]} (replacing any earlier report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
