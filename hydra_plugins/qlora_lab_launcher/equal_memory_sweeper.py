"""sweep.equal_memory=true: Hydra's basic sweeper, then one more job per QLoRA job, in which QLoRA spends the
memory it saves: the same settings with train.batch_size=auto under train.memory_cap_gib = the peak memory its
LoRA job (the same settings with quantization=none: same data size, seed and rows) measured in this sweep.

The cap must come from a finished LoRA job, so these jobs are launched as a second batch, after every job of
the sweep's product has ended (also when several GPUs run jobs at once). The cap is written into each job's
overrides, so the job's recorded config says what it ran under, and `verify` could re-run it alone.

SweepReport (qlora_lab/callbacks.py) puts this sweeper in place of the basic one when sweep.equal_memory=true.
Kept free of heavy imports: Hydra imports every plugin module on every start.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from qlora_lab.layout import RunLayout  # a few lines, no heavy imports

log = logging.getLogger(__name__)
SPENT = ("train.batch_size", "train.memory_cap_gib")  # what an equal-memory job sets on top of its QLoRA job


def _keyed(overrides: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(key, the override as written, its value as written) of each of a job's overrides, read by Hydra's
    parser."""
    return [
        (o.key_or_group, o.input_line, None if o.is_delete() else o.get_value_string())
        for o in OverridesParser.create().parse_overrides(list(overrides))
    ]


def _quantization(overrides: Sequence[str]) -> str | None:
    return next((value for key, _, value in _keyed(overrides) if key == "quantization"), None)


def _twin_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """A job's settings less its quantization: a LoRA job and a QLoRA job with the same key are a pair."""
    return tuple(sorted(line for key, line, _ in _keyed(overrides) if key != "quantization"))


def measured_peak(job_dir: Path) -> float | None:
    """Training's peak memory of a job that completed (run.json, metrics.json: qlora_lab/rundir.py), else
    None; the whole job's peak where training did not record its own."""
    try:
        if json.loads(RunLayout(job_dir).run_json.read_text()).get("status") != "completed":
            return None
        metrics = json.loads(RunLayout(job_dir).metrics_json.read_text())
        return metrics.get("memory/train_peak_gib", metrics.get("memory/peak_gib"))
    except (OSError, ValueError):
        return None


def equal_memory_jobs(jobs: Sequence[Any]) -> tuple[list[list[str]], list[str]]:
    """From the finished jobs (each with .overrides and .working_dir): the overrides of one equal-memory job
    per QLoRA job whose LoRA twin completed, and a sentence for each QLoRA job that gets none."""
    peaks = {}
    for job in jobs:
        if _quantization(job.overrides) == "none":
            peak = measured_peak(Path(job.working_dir))
            if peak:
                peaks[_twin_key(job.overrides)] = peak
    extra, skipped = [], []
    for job in jobs:
        if _quantization(job.overrides) in (None, "none"):
            continue
        peak = peaks.get(_twin_key(job.overrides))
        if peak is None:
            skipped.append(
                f"no equal-memory job for {' '.join(job.overrides)}: its LoRA job (quantization=none) "
                f"did not complete with a measured peak"
            )
            continue
        cap = math.floor(peak * 1e4) / 1e4  # 4 decimals, never above LoRA's peak
        extra.append(
            [line for key, line, _ in _keyed(job.overrides) if key not in SPENT]
            + ["train.batch_size=auto", f"train.memory_cap_gib={cap}"]
        )
    return extra, skipped


class EqualMemorySweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        returns = super().sweep(arguments)  # the product, as the basic sweeper runs it
        if not OmegaConf.select(self.config, "sweep.equal_memory"):
            return returns
        done = [job for batch in returns for job in batch]
        extra, skipped = equal_memory_jobs(done)
        for sentence in skipped:
            log.warning(sentence)
        if extra:
            log.info(
                f"Equal memory: {len(extra)} QLoRA jobs with train.batch_size=auto under their LoRA job's "
                "peak"
            )
            self.validate_batch_is_legal(extra)
            returns.append(self.launcher.launch(extra, initial_job_idx=len(done)))
        return returns
