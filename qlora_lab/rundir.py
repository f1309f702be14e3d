"""A run directory's bookkeeping: run.json (what ran, where, how it ended) and metrics.json (flat numbers)."""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError

PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "hydra-core", "omegaconf"]
# Groups a later stage takes from the run it continues, unless the command line names them.
INHERITED_GROUPS = ["model", "quantization", "lora", "dataset"]


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip() or None
    except Exception:
        return None


def is_main_process() -> bool:
    """False on the non-zero ranks of a distributed launch: only rank 0 writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def hardware() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    return info


def peak_memory_gib() -> dict:
    """GPU: allocator peaks since the job started. CPU: this process's peak RSS (one process per job)."""
    if torch.cuda.is_available():
        return {"memory/peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "memory/peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return {"memory/peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@dataclass
class Run:
    dir: Path  # this job's directory (Hydra's output dir): run.json, metrics.json, .hydra/
    source: Path  # the run whose adapter/ and merged/ the stages use: run_dir=..., else `dir`
    info: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def start(self, cfg: DictConfig) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.info = {"status": "running", "stages": list(cfg.pipeline.stages), "source_run": str(self.source),
                     "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv), "git_sha": _git_sha(), "seed": cfg.train.seed,
                     "data_seed": cfg.dataset.seed, "versions": _versions(), "hardware": hardware()}
        self._write_info()

    def note(self, **info) -> None:
        self.info.update(info)
        self._write_info()

    def log(self, metrics: dict) -> None:
        # .item(): numpy/torch scalars become plain numbers so that json can write them
        self.metrics.update({k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()})
        if is_main_process():
            (self.dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n")

    def finish(self, error: BaseException | None = None) -> None:
        wall = time.perf_counter() - self.started
        self.log({"time/wall_s": wall} | peak_memory_gib())
        self.info.update(status="failed" if error else "completed", wall_time_s=round(wall, 2),
                         ended_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if error:
            self.info["error"] = f"{type(error).__name__}: {error}"
        self._write_info()

    def _write_info(self) -> None:
        if is_main_process():
            (self.dir / "run.json").write_text(json.dumps(self.info, indent=2) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def inherit_from_run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> DictConfig:
    """Take model/quantization/lora/dataset from the run being continued, except groups named on the command line.

    `pipeline=merge run_dir=X` must merge into the base X was trained on, not into today's defaults.
    """
    saved = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} does not exist; pass the folder of a finished training run "
                          f"(the one holding adapter/).")
    if not saved.is_file():
        raise ConfigError(f"run_dir={run_dir} is not a QLoRA Lab run (no .hydra/config.yaml); pass the folder of a "
                          f"training run.")
    old = OmegaConf.load(saved)
    named = {o.split("=", 1)[0].lstrip("+~").split(".", 1)[0].split("/", 1)[0] for o in overrides}
    cfg = cfg.copy()
    for group in INHERITED_GROUPS:
        if group not in named and group in old:
            # a fresh typed node: assigning the plain saved dict to a structured field fails validation
            cfg[group] = OmegaConf.merge(OmegaConf.structured(OmegaConf.get_type(cfg, group)), old[group])
    return cfg
