"""Hydra callbacks: guard run directories before Hydra writes into them; report a sweep when it ends."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .layout import RunLayout

SWEEP = {"dir": None}  # this process's sweep folder, once a multirun started: run_cli names it on a Ctrl-C


def _rank() -> int:
    from qlora_lab.distributed import rank  # lazily: Hydra imports callbacks before the app

    return rank()


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _holds_results(p: Path) -> bool:
    # In a distributed launch the other ranks start in the same folder at the same moment and may already have
    # opened their log file there: only earlier results count.
    from qlora_lab.distributed import world_size

    distributed = world_size() > 1
    return p.is_dir() and any(not (distributed and f.suffix == ".log") for f in p.iterdir())


def _overrides(overrides: list[str]) -> list:
    from .rundir import parse_overrides

    return parse_overrides(overrides)


def _given(config: DictConfig, key: str) -> bool:
    return any(o.key_or_group == key and not o.is_delete() for o in _overrides(config.hydra.overrides.hydra))


def check_writable(path: Path, config: DictConfig, key: str) -> None:
    """A file where the run folder or one above it should be: say which setting put it there."""
    from .validation import folder_problem

    problem = folder_problem(path)
    if problem:
        named = f"{key}={path}" if _given(config, key) else f"paths.output_dir={config.paths.output_dir}"
        _refuse(
            f"{named} cannot hold the run folder: {problem}; point it at a folder (or a path that does not "
            "exist yet)."
        )


MIN_FREE = 1 << 20  # bytes: below this Hydra could not even write the run's config and log


def check_free_space(path: Path) -> None:
    """A disk already full at start would fail inside Hydra (writing .hydra/), with a traceback: say it
    first."""
    from .rundir import free_space, size_text

    free = free_space(path)
    if free < MIN_FREE:
        _refuse(
            f"no space left on the disk holding {path} ({size_text(free)} free); free some space (a run "
            "needs room for its config, log, checkpoints and adapter), or point paths.output_dir at another "
            "disk."
        )


def claim(path: Path, marker: str, explicit: bool, key: str) -> Path:
    """Take a run/sweep folder for this process alone. Creating `marker` in it (the folder Hydra writes next)
    with O_EXCL/mkdir is atomic: of two processes started in the same second only one succeeds; the other
    takes the next free `_1`, `_2`, ... sibling (or, for a folder the user named, stops)."""
    for n in range(1000):
        candidate = path if n == 0 else path.with_name(f"{path.name}_{n}")
        if not _holds_results(candidate):
            candidate.mkdir(parents=True, exist_ok=True)
            try:
                if marker.endswith(".yaml"):
                    os.close(os.open(candidate / marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                else:
                    (candidate / marker).mkdir()
                return candidate
            except FileExistsError:
                pass  # another process took it between our look and our claim
        if explicit:
            _refuse(
                f"{key}={path} already exists and is not empty; choose a new {key} (or leave it unset for a "
                f"fresh timestamped folder) so that no earlier result is overwritten."
            )
    _refuse(f"no free folder next to {path}; choose {key}.")
    raise AssertionError  # unreachable: _refuse exits


class RunDirGuard(Callback):
    """Each run gets a folder of its own: never a non-empty one (Hydra would overwrite `.hydra/` and our
    results), never one shared with a run started in the same second. `train.resume=true run_dir=R` trains in
    R itself."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if (
            OmegaConf.select(config, "train.resume") and config.run_dir
        ):  # every rank trains on in the run's folder
            run_dir = Path(str(config.run_dir)).resolve()
            if not RunLayout(run_dir).config.is_file():
                _refuse(
                    f"run_dir={config.run_dir} is not a QLoRA Lab run folder (no .hydra/config.yaml); pass "
                    f"the folder of the run to resume."
                )
            if _given(config, "hydra.run.dir") and Path(str(config.hydra.run.dir)).resolve() != run_dir:
                _refuse(
                    f"train.resume=true continues run_dir={config.run_dir} in that folder, but "
                    f"hydra.run.dir={config.hydra.run.dir} names another; drop hydra.run.dir."
                )
            check_free_space(run_dir)
            with read_write(config.hydra):
                config.hydra.run.dir = str(run_dir)
                config.hydra.output_subdir = (
                    None  # keep the run's own config: the resumed run is checked against it
                )
            return
        if _rank() > 0:
            # rank 0 checks the folder and writes .hydra/; the others must not race it
            with read_write(config.hydra):
                config.hydra.output_subdir = None
            return
        subdir = config.hydra.output_subdir or ".hydra"
        check_writable(Path(str(config.hydra.run.dir)), config, "hydra.run.dir")
        check_free_space(Path(str(config.hydra.run.dir)))
        path = claim(
            Path(str(config.hydra.run.dir)), subdir, _given(config, "hydra.run.dir"), "hydra.run.dir"
        )
        with read_write(config.hydra):
            config.hydra.run.dir = str(path)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if OmegaConf.select(config, "train.resume"):
            if not _given(config, "hydra.sweep.dir") or not sweep_dir.is_dir():
                _refuse(
                    f"train.resume=true in a sweep continues an earlier sweep: give its folder as "
                    f"hydra.sweep.dir=DIR (got {sweep_dir}, "
                    f"{'missing' if not sweep_dir.is_dir() else 'unset'})."
                )
            SWEEP["dir"] = str(sweep_dir)
            return  # completed jobs are skipped, the others resumed or run (qlora_lab.resume.job_to_resume)
        check_writable(sweep_dir, config, "hydra.sweep.dir")
        check_free_space(sweep_dir)
        path = claim(sweep_dir, "multirun.yaml", _given(config, "hydra.sweep.dir"), "hydra.sweep.dir")
        with read_write(config.hydra):
            config.hydra.sweep.dir = str(path)
        SWEEP["dir"] = str(path)


def seed_axis(config: DictConfig) -> str | None:
    """sweep.repeats=N as a train.seed axis (train.seed, train.seed+1, ...), refused when it cannot be one."""
    repeats = OmegaConf.select(config, "sweep.repeats", default=1)
    if not isinstance(repeats, int) or repeats < 1:
        _refuse(f"sweep.repeats must be 1 or more seeds per cell (got {repeats}).")
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    swept = "train.seed" in params or any(
        o.key_or_group == "train.seed" and o.is_sweep_override()
        for o in _overrides(config.hydra.overrides.task)
    )
    if repeats == 1:
        return None
    if swept:
        _refuse("sweep.repeats and a train.seed axis both choose the seeds; give one of them.")
    if "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")):
        _refuse("sweep.repeats works with the basic sweeper only; an Optuna search samples its own trials.")
    seed = int(config.train.seed)
    return ",".join(str(seed + i) for i in range(repeats))


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
EQUAL_MEMORY_SWEEPER = "hydra_plugins.qlora_lab_launcher.equal_memory_sweeper.EqualMemorySweeper"


def swept_values(config: DictConfig, key: str) -> list[str]:
    """The values a basic sweep gives `key` (its sweeper params, then the command line: the latter wins)."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    lines = [f"{key}={params[key]}"] if key in params else []
    given = [o for o in _overrides([*lines, *config.hydra.overrides.task]) if o.key_or_group == key]
    if not given or given[-1].is_delete():
        return []
    last = given[-1]
    return (
        list(last.sweep_string_iterator()) if last.is_sweep_override() else [last.get_value_element_as_str()]
    )


def equal_memory_sweeper(config: DictConfig) -> str | None:
    """sweep.equal_memory=true: the sweeper that adds the equal-memory jobs, refused where it cannot add
    them."""
    if not OmegaConf.select(config, "sweep.equal_memory", default=False):
        return None
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if target not in (BASIC_SWEEPER, EQUAL_MEMORY_SWEEPER):
        _refuse(
            f"sweep.equal_memory works with the basic sweeper only (this sweep uses {target.split('.')[-1]})."
        )
    modes = swept_values(config, "quantization")
    if "none" not in modes or len(modes) < 2:
        _refuse(
            f"sweep.equal_memory caps QLoRA at LoRA's measured peak, so the sweep needs both: sweep "
            f"quantization=none,nf4 (this sweep runs quantization="
            f"{','.join(modes) or OmegaConf.select(config, 'hydra.runtime.choices.quantization')} only)."
        )
    return EQUAL_MEMORY_SWEEPER


class SweepReport(Callback):
    """When a multirun ends, write summary.csv, summary.md and plots into the sweep dir and print the table.
    When it starts, turn sweep.repeats=N into a train.seed axis (Hydra reads the sweeper's params after this),
    and for sweep.equal_memory=true put the equal-memory sweeper in the basic one's place (Hydra creates it
    after this)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = equal_memory_sweeper(config)
        if sweeper:
            with read_write(config.hydra):
                config.hydra.sweeper._target_ = sweeper
        seeds = seed_axis(config)
        if seeds:
            with read_write(config.hydra), open_dict(config.hydra):
                if config.hydra.sweeper.get("params") is None:
                    config.hydra.sweeper.params = {}
                config.hydra.sweeper.params["train.seed"] = seeds

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .config import ConfigError
        from .report import write_report  # imported here: single runs never pay for matplotlib

        sweep_dir = config.hydra.sweep.dir
        try:
            print(write_report(sweep_dir), flush=True)
        except ConfigError as e:  # e.g. every job stopped before Hydra wrote its folder
            print(f"error: no sweep report: {e}", file=sys.stderr)
            sys.exit(1)
        print(
            f"report: {Path(sweep_dir) / 'summary.md'} (rebuild it with `python -m qlora_lab.report "
            f"{sweep_dir}`)",
            flush=True,
        )
        from .report import collect

        rows = collect(Path(sweep_dir))
        bad = [r for r in rows if r["status"] != "completed"]
        if bad:  # a sweep with failed jobs is a failed sweep: exit non-zero, every job's reason listed
            print(f"error: {len(bad)} of {len(rows)} jobs did not complete:", file=sys.stderr)
            for r in bad:
                print(f"  {r['job']}: {r['status']}: {r['error'] or '?'}", file=sys.stderr)
            sys.exit(1)
