"""`python -m qlora_lab.report verify SWEEP_DIR [CELL]`: re-run every job of one cell of a sweep (all modes and
seeds) from the overrides it recorded, into SWEEP_DIR/verify/<time>/, and say whether the new figures fall inside
the recorded 95% interval of each mode: a card checked into a repository can be re-checked, and drift shows.

CELL is a data size as the report names it ("16", or "16 (recipe=fast)" when other settings vary); by default the
smallest cell, the cheapest to re-run. Exit status: 0 when every figure is inside its interval, 1 on drift, 2 on a
user mistake (one sentence).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .config import ConfigError
from .decision import cells, interval, mode
from .layout import RunLayout

FIGURES = [("eval_loss", "eval loss", 4), ("tokens_per_s", "tokens/s", 0), ("peak_gib", "peak GiB", 3)]


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
    """Compose (and check) the job's config as it is recorded: a cell whose config no longer composes stops here,
    with one sentence, before any job runs."""
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
    """Re-run the cell; return the comparison as markdown and whether every figure stayed inside its interval."""
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
    jobs = [(sweep_dir / r["job"], recorded_overrides(sweep_dir / r["job"])) for r in cell]
    for job_dir, overrides in jobs:
        check_composes(job_dir, overrides)
    out = sweep_dir / "verify" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True)
    new = {}
    for (job_dir, overrides), old in zip(jobs, cell, strict=True):
        run_dir = rerun(job_dir, overrides, out)
        new[old["job"]] = job_row(run_dir) if RunLayout(run_dir).config.is_file() else {"status": "failed"}
    lines = [
        f"# Verify: {sweep_dir.name}, cell {cell[0]['cell']}",
        "",
        f"Re-ran {len(jobs)} jobs from their recorded overrides into `{out}`.",
        "",
        "| mode | figure | recorded (mean ± 95% interval) | re-run mean | inside |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    ok = True
    failed = [job for job, r in new.items() if r["status"] != "completed"]
    for q in sorted({r["quantization"] for r in cell}, key=lambda q: (q != "none", q)):
        recorded = [r for r in cell if r["quantization"] == q]
        again = [new[r["job"]] for r in recorded if new[r["job"]]["status"] == "completed"]
        for key, label, digits in FIGURES:
            mean, half = interval([r[key] for r in recorded])
            now, _ = interval([r[key] for r in again])
            if mean is None or now is None:
                continue
            if half is None:
                verdict = "no interval (one seed recorded)"
            elif mean - half <= now <= mean + half:
                verdict = "yes"
            else:
                verdict, ok = "no: drift", False
            lines.append(
                f"| {mode(q)} | {label} | {mean:,.{digits}f}"
                + (f" ± {half:,.{digits}f}" if half is not None else "")
                + f" | {now:,.{digits}f} | {verdict} |"
            )
    if failed:
        ok = False
        lines += [
            "",
            f"{len(failed)} re-run jobs did not complete: {', '.join(failed)} (see their folders in {out}).",
        ]
    lines += [
        "",
        "Every re-run figure is inside its recorded interval."
        if ok
        else "Drift: at least one re-run figure is outside its recorded interval (or a job failed).",
        "",
    ]
    (out / "verify.md").write_text("\n".join(lines))
    return "\n".join(lines), ok


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m qlora_lab.report verify SWEEP_DIR [CELL]   re-runs one cell (default: the smallest) "
            "and checks its figures against the recorded intervals",
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
