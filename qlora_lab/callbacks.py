"""Hydra callbacks: guard run directories before Hydra writes into them; report a sweep when it ends."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _refuse_if_not_empty(path: str, key: str) -> None:
    p = Path(path)
    # In a distributed launch the other ranks start in the same folder at the same moment and may already have
    # opened their log file there: only earlier results count.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if p.is_dir() and any(not (distributed and f.suffix == ".log") for f in p.iterdir()):
        print(f"error: {key}={p} already exists and is not empty; choose a new {key} "
              f"(or leave it unset for a fresh timestamped folder) so that no earlier result is overwritten.",
              file=sys.stderr)
        sys.exit(2)


class RunDirGuard(Callback):
    """Refuse to start in a non-empty run/sweep dir: Hydra would otherwise overwrite `.hydra/` and our results."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank() > 0:
            # rank 0 checks the folder and writes .hydra/; the others must not race it
            with read_write(config.hydra):
                config.hydra.output_subdir = None
            return
        _refuse_if_not_empty(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_if_not_empty(config.hydra.sweep.dir, "hydra.sweep.dir")


class SweepReport(Callback):
    """When a multirun ends, write summary.csv, summary.md and plots into the sweep dir and print the table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .config import ConfigError
        from .report import write_report  # imported here: single runs never pay for matplotlib

        sweep_dir = config.hydra.sweep.dir
        try:
            print(write_report(sweep_dir), flush=True)
        except ConfigError as e:  # e.g. every job stopped before Hydra wrote its folder
            print(f"error: no sweep report: {e}", file=sys.stderr)
            return
        print(f"report: {Path(sweep_dir) / 'summary.md'} (rebuild it with `python -m qlora_lab.report {sweep_dir}`)",
              flush=True)
