"""Hydra callbacks: guard run directories before Hydra writes into them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def _refuse_if_not_empty(path: str, key: str) -> None:
    p = Path(path)
    if p.is_dir() and any(p.iterdir()):
        print(f"error: {key}={p} already exists and is not empty; choose a new {key} "
              f"(or leave it unset for a fresh timestamped folder) so that no earlier result is overwritten.",
              file=sys.stderr)
        sys.exit(2)


class RunDirGuard(Callback):
    """Refuse to start in a non-empty run/sweep dir: Hydra would otherwise overwrite `.hydra/` and our results."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_if_not_empty(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_if_not_empty(config.hydra.sweep.dir, "hydra.sweep.dir")
