"""A run directory's bookkeeping: run.json (what ran, where, how it ended) and metrics.json (flat numbers)."""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .config import ConfigError
from .distributed import is_main_process, world_size
from .layout import RunLayout

PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "hydra-core",
    "omegaconf",
]
# Groups that describe what a run trained: a later stage takes them from the run, field by field (the command
# line changes only the fields it names). Stage settings (generation, inference, eval, merge, pipeline) are
# this job's own.
INHERITED_GROUPS = ["model", "quantization", "lora", "dataset", "train"]


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
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
            or None
        )
    except Exception:
        return None


def hardware() -> dict:
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "world_size": world_size(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if torch.cuda.is_available():
        info.update(
            device="cuda",
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    else:
        info["device"] = "cpu"
    return info


def reset_peak_memory() -> None:
    """Start measuring a new peak (peak_memory_gib): the GPU allocator's, or on a CPU the process's peak
    RSS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gib() -> float:
    """GPU: the allocator's peak since the job started or the last reset_peak_memory(). CPU: this process's
    peak RSS since then (the Python runtime included; one process per job)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class Run:
    dir: Path  # this job's directory (Hydra's output dir): run.json, metrics.json, .hydra/
    source: Path  # the run whose adapter/ and merged/ the stages use: run_dir=..., else `dir`
    info: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    step: int | None = None  # the last finished optimizer step (training stages keep it up to date)
    last_checkpoint: str | None = None

    def start(self, cfg: DictConfig, resume: bool = False) -> None:
        """Write run.json with status `running`. `resume`: keep the record (and metrics) of the earlier
        attempts."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        earlier = read_json(RunLayout(self.dir).run_json) if resume else {}
        if resume:
            self.metrics = read_json(RunLayout(self.dir).metrics_json)
            attempt = {k: earlier.get(k) for k in ("status", "error", "step", "last_checkpoint", "ended_at")}
            earlier["attempts"] = earlier.get("attempts", []) + [attempt]
            for key in ("error", "step", "last_checkpoint", "ended_at", "wall_time_s"):
                earlier.pop(key, None)
        self.info = earlier | {
            "status": "running",
            "stages": list(OmegaConf.select(cfg, "pipeline.stages", default=[]) or []),
            "source_run": str(self.source),
            "started_at": earlier.get("started_at", now),
            "command": " ".join(sys.argv),
            "git_sha": _git_sha(),
            "seed": OmegaConf.select(cfg, "train.seed"),
            "data_seed": OmegaConf.select(cfg, "dataset.seed"),
            "versions": _versions(),
            "hardware": hardware(),
            # pid + host + the process's start time tell a live run from one whose process died (see
            # run_status)
            "pid": os.getpid(),
            "process_started": _process_start(os.getpid()),
        }
        if resume:
            self.info["resumed_at"] = now
        self._write_info()

    def note(self, **info) -> None:
        self.info.update(info)
        self._write_info()

    def log(self, metrics: dict) -> None:
        # .item(): numpy/torch scalars become plain numbers so that json can write them
        self.metrics.update({k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()})
        if is_main_process():
            RunLayout(self.dir).metrics_json.write_text(
                json.dumps(self.metrics, indent=2, sort_keys=True) + "\n"
            )

    def progress(self, step: int | None = None, checkpoint: str | None = None) -> None:
        """Training progress; a new checkpoint is written to run.json at once (the process may be killed
        next)."""
        if step is not None:
            self.step = step
        if checkpoint is not None:
            self.last_checkpoint = checkpoint
            self.note(step=self.step, last_checkpoint=checkpoint)

    def finish(self, error: BaseException | None = None) -> None:
        """completed; interrupted (Ctrl-C / SIGTERM: a KeyboardInterrupt); or failed, with the error."""
        wall = time.perf_counter() - self.started
        if (
            self.metrics or error is None
        ):  # a run refused before any stage measured anything leaves run.json only
            reserved = (
                {"memory/peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
                if torch.cuda.is_available()
                else {}
            )
            self.log({"time/wall_s": wall, "memory/peak_gib": peak_memory_gib()} | reserved)
        status = (
            "completed"
            if error is None
            else "interrupted"
            if isinstance(error, KeyboardInterrupt)
            else "failed"
        )
        self.info.update(
            status=status,
            wall_time_s=round(wall, 2),
            ended_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        if error is not None:
            self.info["error"] = str(error) if status == "interrupted" else f"{type(error).__name__}: {error}"
            self.info.update(step=self.step, last_checkpoint=self.last_checkpoint)
        self._write_info()

    def _write_info(self) -> None:
        if is_main_process():
            RunLayout(self.dir).run_json.write_text(json.dumps(self.info, indent=2) + "\n")


def refuse_existing(paths, fix: str, overwrite: bool = False) -> None:
    """The guard of every stage that writes results: an earlier result (a file, or a folder that is not empty)
    is never written over unless the stage's overwrite setting says so; `fix` says what to do instead."""
    if overwrite:
        return
    for path in map(Path, paths):
        if path.is_dir() and not any(path.iterdir()):
            continue  # an empty folder holds nothing to lose
        if path.exists():
            raise ConfigError(f"{path} already exists{' and is not empty' if path.is_dir() else ''}; {fix}")


def disk_full(error: BaseException | None) -> bool:
    """True for "No space left on device" (or a full quota), also when a library wraps it: safetensors' Rust
    writer raises SafetensorError("Error while serializing: I/O error: No space left on device (os error
    28)")."""
    import errno

    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def free_space(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or would, once created)."""
    import shutil

    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            return shutil.disk_usage(path).free
    return 0


@contextmanager
def disk_space(folder: Path, what: str, then: str, needed=lambda: None, leftovers=lambda: []):
    """A full disk while writing `what` into `folder` ends in one sentence (a ConfigError) naming the folder,
    the free and (when known) the needed space, and what to run once space is freed. `leftovers()`: the
    temporary files or folders being written, removed (a half-written one would only hold on to the space);
    `needed()`: bytes or None. Both are asked only once the disk is full."""
    import shutil

    try:
        yield
    except Exception as e:
        if not disk_full(e):
            raise
        removed = []
        for path in leftovers():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
        try:
            need = needed()
        except Exception:  # an estimate only: never hide the real message behind another error
            need = None
        need = f", about {size_text(need)} needed" if need else ""
        removed = f"; the partial {', '.join(removed)} removed" if removed else ""
        raise ConfigError(
            f"no space left on the disk holding {folder} while writing {what} "
            f"({size_text(free_space(folder))} free{need}{removed}); free some space, then "
            f"{then}."
        ) from None


_held_lock = None  # the open lock file of the run folder this process works in (see hold_run_dir)


def hold_run_dir(folder: Path) -> None:
    """Lock the run folder for this process: fcntl.flock on .hydra/lock, released by the OS when the process
    ends, however it ends (a SIGKILL included), so a second process resuming the same run is refused while
    this one lives. The lock file holds the holder's pid and host, for that refusal. A sweep's jobs run one
    after another in one process: taking the next job's folder lets go of the previous one."""
    import fcntl

    global _held_lock
    if _held_lock is not None:
        _held_lock.close()
        _held_lock = None
    RunLayout(folder).hydra.mkdir(parents=True, exist_ok=True)
    f = open(RunLayout(folder).lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        raise ConfigError(
            f"run_dir={folder} is in use by another process ({holder}); wait for it to end or stop "
            f"it, then run this again."
        ) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held_lock = f


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:  # a file cut short by a crash reads as no record
        return {}


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def run_status(info: dict) -> tuple[str, str]:
    """(status, error) as they really are: a `running` record whose process is gone becomes `died`.

    The pid is checked only on the host that wrote it; its start time tells a reused pid from the original
    process.
    """
    status, error = info.get("status"), info.get("error", "")
    if status != "running":
        return status, error
    host, pid, started = info.get("hardware", {}).get("host"), info.get("pid"), info.get("process_started")
    if host != socket.gethostname() or pid is None:
        return (
            ("running", f"on {host}") if pid is not None else ("died", "the run recorded no process to check")
        )
    alive = _process_start(pid)
    if alive is not None and (started is None or abs(alive - started) < 1):
        return "running", ""
    when = datetime.fromtimestamp(started).isoformat(timespec="seconds") if started else "?"
    step = f" at step {info['step']}" if info.get("step") is not None else ""
    return "died", (
        f"its process (pid {pid} on {host}, started {when}) is gone without recording an ending{step}; "
        f"last checkpoint: {info.get('last_checkpoint')}"
    )


def saved_config(run_dir: Path) -> DictConfig:
    saved = RunLayout(run_dir).config
    if not run_dir.is_dir():
        raise ConfigError(
            f"run_dir={run_dir} does not exist; pass the folder of a training run (the one holding adapter/)."
        )
    if not saved.is_file():
        raise ConfigError(
            f"run_dir={run_dir} is not a QLoRA Lab run (no .hydra/config.yaml); pass the folder of a "
            f"training run."
        )
    return OmegaConf.load(saved)


def parse_overrides(overrides: list[str]) -> list:
    """Command-line overrides as Hydra's own parser reads them (hydra.core.override_parser.types.Override)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def override_keys(overrides: list[str]) -> list[str]:
    """The key (or group) of each command-line override: `+x.y=1`, `~x.y` and `x.y=[a,b]` all name `x.y`."""
    return [o.key_or_group for o in parse_overrides(overrides)]


def override_values(overrides: list[str]) -> dict[str, str]:
    """{key as written, with its `+`, `++` or `~`: value as written} of the overrides that give a value."""
    return {
        o.get_key_element(): o.get_value_string()
        for o in parse_overrides(overrides)
        if not (o.is_delete() and o.value() is None)  # `~x.y` deletes without one
    }


def named_on_command_line(cfg: DictConfig, overrides: list[str]) -> tuple[set[str], list[str]]:
    """(groups whose option the command line picks, e.g. `dataset=gsm8k`; fields it sets, e.g.
    `dataset.size`)."""
    groups, fields = set(), []
    for key in override_keys(overrides):
        if "." not in key and key in cfg and OmegaConf.is_dict(cfg[key]):
            groups.add(key)
        else:
            fields.append(key)
    return groups, fields


def inherit_from_run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    keys: list[str] = INHERITED_GROUPS,
    all_named: bool = False,
) -> tuple[DictConfig, list[str]]:
    """Take `keys` (groups or top-level fields) from the run's saved config, then apply the command line's
    own: a field it names (`dataset.eval_size=4`) replaces that field only; a group option it picks
    (`dataset=gsm8k`) replaces the whole group. `all_named`: every field counts as named (the composed config
    wins everywhere).

    Returns the config and the fields that came from the run (to say so when one of them is refused).
    """
    old = saved_config(run_dir)
    groups, fields = named_on_command_line(cfg, overrides)
    out = cfg.copy()
    inherited: list[str] = []
    for key in keys:
        if key not in old or key in groups or all_named:
            continue
        if OmegaConf.is_dict(cfg[key]):
            # a fresh typed node: assigning the plain saved dict to a structured field fails validation
            out[key] = OmegaConf.merge(OmegaConf.structured(OmegaConf.get_type(cfg, key)), old[key])
        elif key not in fields:
            out[key] = old[key]
        mine = [f for f in fields if f == key or f.startswith(f"{key}.")]
        for path in mine:
            with open_dict(out):  # a `+key` the schema lacks is kept, for validate() to name it
                OmegaConf.update(out, path, OmegaConf.select(cfg, path), merge=False)
        leaves = OmegaConf.to_container(out[key]) if OmegaConf.is_dict(out[key]) else None
        paths = [f"{key}.{k}" for k in leaves] if isinstance(leaves, dict) else [key]
        inherited += [p for p in paths if not any(p == f or p.startswith(f"{f}.") for f in mine)]
    return out, inherited


def explain_inherited(message: str, inherited: list[str], run_dir: str) -> str:
    """Say so when a refused value was not on the command line but came from run_dir's config."""
    named = [f for f in sorted(inherited, key=len, reverse=True) if f in message]
    if not named:
        return message
    return (
        f"{message.rstrip('.')} ({named[0]} came from run_dir={run_dir}; set it on the command line to "
        "change it)."
    )
