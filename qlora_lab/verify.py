"""`python -m qlora_lab.report verify SWEEP_DIR [CELL]`: re-run every job of one cell of a sweep (all modes
and seeds) from the overrides it recorded, into SWEEP_DIR/verify/<time>/, and say whether the new figures fall
inside the recorded 95% interval of each mode: a card checked into a repository can be re-checked, and drift
shows. With sweep.equal_memory the cell's equal-memory jobs are re-run too, under the cap they recorded (their
LoRA job's peak in the sweep, not a new measurement), and checked against the card's equal-memory figures.

CELL is a data size as the report names it ("16", or "16 (recipe=fast)" when other settings vary); by default
the smallest cell, the cheapest to re-run. Exit status: 0 when every figure is inside its interval, 1 on
drift, 2 on a user mistake (one sentence).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .config import ConfigError
from .decision import TARGET_GAP, cells, interval, mode, reach
from .layout import RunLayout

FIGURES = [("eval_loss", "eval loss", 4), ("tokens_per_s", "tokens/s", 0), ("peak_gib", "peak GiB", 3)]
DRIFT = "no: drift"
HARDWARE_BOUND = {"tokens_per_s", "peak_gib"}  # compared only when the re-run runs on the recorded device
# An equal-memory job's figures: the batch it found under its cap, then what that batch gave, then its time to
# the card's target (LoRA's final eval loss + 2%), read from its learning curve as the card reads it.
SPENT_FIGURES = [
    ("batch", "batch found", 0),
    ("eval_loss", "eval loss", 4),
    ("tokens_per_s", "tokens/s", 0),
    ("peak_gib", "peak GiB", 3),
    ("tokens_to_target", "tokens to target", 0),
    ("train_s_to_target", "train s to target", 1),
]
CPU_NOTE = (
    "On a CPU the memory cap bounds the job process's peak RSS (the Python runtime and its libraries "
    "included; it "
    "varies between runs of the same job), not GPU memory, so the batch the equal-memory jobs find under it "
    "and "
    "their peak are hardware-bound: shown, but a re-run outside the recorded values is not counted as drift, "
    "and where the re-run found another batch its other figures are not counted either."
)


def pick_cell(rows: list[dict], sweep_dir: Path, name: str | None) -> list[dict]:
    found = cells(rows)
    if not found:
        raise ConfigError(
            f"{sweep_dir} has no completed job to verify against; verify a sweep whose jobs completed."
        )
    if name is None:
        return found[0]
    cell = next((c for c in found if c[0]["cell"] == name), None)
    if cell is None:
        raise ConfigError(
            f"{sweep_dir} has no cell {name!r}; its cells are {', '.join(repr(c[0]['cell']) for c in found)}."
        )
    return cell


def recorded_overrides(job_dir: Path) -> list[str]:
    return [str(o) for o in OmegaConf.load(RunLayout(job_dir).overrides)]


def check_composes(job_dir: Path, overrides: list[str]) -> None:
    """Compose (and check) the job's config as it is recorded: a cell whose config no longer composes stops
    here, with one sentence, before any job runs."""
    from hydra import compose, initialize_config_dir

    from .config import project_root, register
    from .validation import validate

    register()
    try:
        with initialize_config_dir(config_dir=str(Path(project_root()) / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        validate(cfg)
    except Exception as e:  # noqa: BLE001 - Hydra's and the schema's errors alike: the cell cannot be re-run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{job_dir.name} no longer composes from its recorded overrides ({' '.join(overrides)}): {first}"
        ) from None


def this_device() -> str:
    """The device a re-run here records, named as the report names a job's (qlora_lab/report.py job_row)."""
    from .rundir import hardware

    hw = hardware()
    return hw.get("gpu") or hw["device"]


def spent_figures(job: dict, target: float | None) -> dict:
    """SPENT_FIGURES of one equal-memory job; tokens and train s to target are None where it did not reach
    it."""
    hit = reach(job["_curve"], target) if target is not None and job["_curve"] else None
    return {
        "batch": job["batch_size_used"],
        "eval_loss": job["eval_loss"],
        "tokens_per_s": job["tokens_per_s"],
        "peak_gib": job["peak_gib"],
        "tokens_to_target": hit and hit["tokens"],
        "train_s_to_target": hit and hit["train_s"],
        "best": min((p["loss"] for p in job["_curve"]), default=None),
    }


def judge(recorded: list, again: list, digits: int, discrete: bool = False) -> tuple[str, str, str]:
    """Recorded figure, re-run figure and whether the re-run is inside: the 95% interval of the recorded mean,
    or for a discrete figure (the batch found) the recorded values' range."""
    if discrete:
        old, new = sorted({v for v in recorded if v is not None}), sorted({v for v in again if v is not None})
        inside = bool(old) and bool(new) and old[0] <= new[0] and new[-1] <= old[-1]
        return ", ".join(map(str, old)), ", ".join(map(str, new)), "yes" if inside else DRIFT
    mean, half = interval(recorded)
    now, _ = interval(again)
    text = f"{mean:,.{digits}f}" + (f" ± {half:,.{digits}f}" if half is not None else "")
    if half is None:
        return text, f"{now:,.{digits}f}", "no interval (one seed recorded)"
    return text, f"{now:,.{digits}f}", "yes" if mean - half <= now <= mean + half else DRIFT


def not_reached(figures: list[dict]) -> str:
    best = min((f["best"] for f in figures if f["best"] is not None), default=None)
    return "not reached" + (f" (best {best:.4f})" if best is not None else "")


def spent_rows(recorded: list[dict], again: list[dict], target: float | None, on_cpu: bool) -> list[tuple]:
    """(figure, recorded, re-run, verdict) for the equal-memory jobs of one quantized mode."""
    old = [spent_figures(r, target) for r in recorded]
    new = [spent_figures(r, target) for r in again]
    same_batch = {f["batch"] for f in new} <= {f["batch"] for f in old}
    found = []
    for key, label, digits in SPENT_FIGURES:
        before = [f[key] for f in old if f[key] is not None]
        after = [f[key] for f in new if f[key] is not None]
        if key.endswith("_to_target"):
            if target is None or not any(r["_curve"] for r in recorded):
                continue  # no learning curves (train.eval_steps) or no LoRA job: no target on the card either
            if not before or not after:  # reached in neither, or in one only: the reaching itself is compared
                was = judge(before, before, digits)[0] if before else not_reached(old)
                now = f"{interval(after)[0]:,.{digits}f}" if after else not_reached(new)
                found.append((label, was, now, "yes" if not before and not after else DRIFT))
                continue
        elif not before or not after:
            continue
        was, now, verdict = judge(before, after, digits, discrete=key == "batch")
        if on_cpu and verdict == DRIFT and key in ("batch", "peak_gib"):
            verdict = "outside, not counted (CPU: RSS)"
        elif on_cpu and not same_batch and key not in ("batch", "peak_gib"):
            verdict = "not counted (CPU: the re-run found another batch)"
        found.append((label, was, now, verdict))
    return found


def rerun(job_dir: Path, overrides: list[str], out: Path) -> Path:
    """One fresh process per job, as the sweep's isolated launcher ran it."""
    run_dir = (
        out / job_dir.name.split("_", 1)[0]
    )  # the job number: the full name's commas would split the override
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(
        [sys.executable, "-m", "qlora_lab", *overrides, f"hydra.run.dir={run_dir}"], env=env, check=False
    )
    return run_dir


def verify(sweep_dir: str | Path, cell_name: str | None = None) -> tuple[str, bool]:
    """Re-run the cell; return the comparison as markdown and whether every figure stayed inside its
    interval."""
    from .report import collect, job_row

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} is not a folder; pass a sweep dir (outputs/multirun/<name>/<time>).")
    rows = collect(sweep_dir)
    if not rows:
        raise ConfigError(
            f"{sweep_dir} is not a sweep: it holds no job folders (none with .hydra/config.yaml)."
        )
    cell = pick_cell(rows, sweep_dir, cell_name)
    # sweep.equal_memory's jobs of this cell (cells() leaves them out): re-run those that completed
    spent_all = [r for r in rows if r.get("equal_memory") and r["cell"] == cell[0]["cell"]]
    spent = [r for r in spent_all if r["status"] == "completed"]
    recorded_on, here = cell[0]["device"], this_device()
    notes = []
    if len(spent) < len(spent_all):
        notes.append(
            f"{len(spent_all) - len(spent)} equal-memory jobs of this cell did not complete in the sweep: "
            "not re-run (no figures to compare with)."
        )
    if spent and here != recorded_on:
        notes.append(
            f"The {len(spent)} equal-memory jobs are not re-run: their cap is LoRA's peak measured on "
            f"{recorded_on}, and on this machine ({here}) it would bound another memory, so the batch they "
            "find and every figure that follows from it could not be compared."
        )
        spent = []
    caps = ", ".join(sorted({f"{r['memory_cap_gib']:g}" for r in spent}))
    jobs = [(sweep_dir / r["job"], recorded_overrides(sweep_dir / r["job"])) for r in cell + spent]
    for job_dir, overrides in jobs:
        check_composes(job_dir, overrides)
    out = sweep_dir / "verify" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True)
    new = {}
    for (job_dir, overrides), old in zip(jobs, cell + spent, strict=True):
        run_dir = rerun(job_dir, overrides, out)
        new[old["job"]] = job_row(run_dir) if RunLayout(run_dir).config.is_file() else {"status": "failed"}
    lines = [
        f"# Verify: {sweep_dir.name}, cell {cell[0]['cell']}",
        "",
        f"Re-ran {len(jobs)} jobs from their recorded overrides into `{out}`."
        + (
            f" The {len(spent)} equal-memory jobs ran under the cap they recorded (train.memory_cap_gib "
            f"{caps}: their LoRA job's peak in the sweep), not a new measurement."
            if spent
            else ""
        ),
        "",
        "| mode | figure | recorded (mean ± 95% interval) | re-run mean | inside |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    found = []  # (mode, figure, recorded, re-run, verdict)
    failed = [job for job, r in new.items() if r["status"] != "completed"]
    moved = {r["device"] for r in new.values() if r["status"] == "completed"} - {recorded_on}
    for q in sorted({r["quantization"] for r in cell}, key=lambda q: (q != "none", q)):
        recorded = [r for r in cell if r["quantization"] == q]
        again = [new[r["job"]] for r in recorded if new[r["job"]]["status"] == "completed"]
        for key, label, digits in FIGURES:
            before = [r[key] for r in recorded if r[key] is not None]
            after = [r[key] for r in again if r[key] is not None]
            if not before or not after:
                continue
            was, now, verdict = judge(before, after, digits)
            if moved and key in HARDWARE_BOUND:
                verdict = f"not compared (recorded on {recorded_on}, re-run on {', '.join(sorted(moved))})"
            found.append((mode(q), label, was, now, verdict))
    lora_final, _ = interval([r["eval_loss"] for r in cell if r["quantization"] == "none"])
    target = None if lora_final is None else lora_final * (1 + TARGET_GAP)
    for q in sorted({r["quantization"] for r in spent}):
        recorded = [r for r in spent if r["quantization"] == q]
        again = [new[r["job"]] for r in recorded if new[r["job"]]["status"] == "completed"]
        found += [
            (f"{mode(q)} at equal memory", *row)
            for row in spent_rows(recorded, again, target, on_cpu=recorded_on == "cpu")
        ]
    lines += ["| " + " | ".join(row) + " |" for row in found]
    ok = not failed and all(row[-1] != DRIFT for row in found)
    uncounted = any(row[-1].startswith(("not ", "outside")) for row in found)
    if spent and recorded_on == "cpu":
        notes.append(CPU_NOTE)
    if spent and target is not None:
        notes.append(
            f"Target: LoRA's recorded final eval loss in this cell + {100 * TARGET_GAP:g}% ({target:.4f}), "
            "as on the card; the first evaluation of a job's learning curve at or below it."
        )
    if failed:
        notes.append(
            f"{len(failed)} re-run jobs did not complete: {', '.join(failed)} (see their folders in {out})."
        )
    for note in notes:
        lines += ["", note]
    lines += [
        "",
        "Every re-run figure is inside its recorded interval."
        if ok and not uncounted
        else "No drift: every counted re-run figure is inside its recorded interval (the notes above say why "
        "the others are not counted)."
        if ok
        else "Drift: at least one re-run figure is outside its recorded interval (or a job failed).",
        "",
    ]
    (out / "verify.md").write_text("\n".join(lines))
    return "\n".join(lines), ok


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m qlora_lab.report verify SWEEP_DIR [CELL]   re-runs one cell (default: the "
            "smallest) and checks its figures against the recorded intervals",
            file=sys.stderr,
        )
        return 2
    try:
        text, ok = verify(argv[0], argv[1] if len(argv) == 2 else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if ok else 1
