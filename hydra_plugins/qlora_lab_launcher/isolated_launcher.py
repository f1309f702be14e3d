"""`hydra/launcher=isolated`: run each of a sweep's jobs in a fresh Python process; on a machine with several
GPUs, one job per GPU at a time.

Why not Hydra's joblib launcher: with n_jobs=1 joblib runs every job in the launching process, and with
n_jobs>1 its workers are reused across jobs and share the devices. Either way a job's peak RSS, allocator
state and timing carry over from the jobs before it. A fresh `spawn`ed process per job gives each job clean
memory and time figures; with N GPUs, N such processes run at once, each seeing only its own GPU
(CUDA_VISIBLE_DEVICES), so that each job computes exactly what it would alone. Everything else follows Hydra's
BasicLauncher.

Kept free of heavy imports: Hydra imports every plugin module on every start.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict
from omegaconf.basecontainer import BaseContainer

from qlora_lab.layout import RunLayout  # a few lines, no heavy imports

log = logging.getLogger(__name__)


def _task_address(fn: TaskFunction) -> tuple[str, str]:
    """Where the child finds the task function again. `python -m pkg` runs pkg/__main__.py as `__main__`,
    which spawn does not re-run in the child: import it by its real name there."""
    module = fn.__module__
    spec = getattr(sys.modules.get(module), "__spec__", None)
    return (spec.name if module == "__main__" and spec is not None else module), fn.__qualname__


def _task_function(module: str, qualname: str) -> TaskFunction:
    """The undecorated task function, imported in the child (which also registers the app's resolvers)."""
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return inspect.unwrap(fn)  # @hydra.main wraps it; Hydra calls the function inside


def _execute_job(
    sweep_config: DictConfig,
    hydra_context: HydraContext,
    task: tuple[str, str],
    singletons: dict,
    argv: list[str],
    gpu: str | None,
) -> tuple[str, Any]:
    """Runs in the child process: what Hydra's own launchers do for one job. Returns (status, value or
    error)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything in this fresh process initialises CUDA
    sys.argv = argv  # run.json records the sweep's command, not multiprocessing's
    task_function = _task_function(*task)
    setup_globals()
    # OmegaConf resolvers are closures that pickle cannot carry; the child has its own: Hydra's
    # (setup_globals) and the app's, registered again when _task_function imported the app's module.
    Singleton.set_state({"instances": singletons, "omegaconf_resolvers": BaseContainer._resolvers})
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    # A JobReturn holds Hydra's config classes, which pickle cannot send back: send back what the sweeper
    # reads.
    if ret.status is JobStatus.COMPLETED:
        return "COMPLETED", ret.return_value
    return "FAILED", f"{type(ret._return_value).__name__}: {ret._return_value}"


def _record_crash(job_dir: Path, message: str) -> None:
    """A process that died (killed, out of memory) could not write its own ending: write it into run.json."""
    path = RunLayout(job_dir).run_json
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(status="failed", error=message)
    job_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")


def visible_gpus() -> list[str]:
    """The GPUs jobs may use: CUDA_VISIBLE_DEVICES when set (the user's choice), else every GPU torch sees."""
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is not None:
        return [g.strip() for g in chosen.split(",") if g.strip() and g.strip() != "-1"]
    import torch  # here, not at module level: Hydra imports every plugin on every start

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def jobs_at_once(n_jobs: int | str, gpus: list[str]) -> int:
    """hydra.launcher.n_jobs: `auto` is one job per GPU (one at a time without GPUs); a number may not exceed
    the GPUs, since each job needs one of its own. Raises ValueError with the sentence for the user."""
    if n_jobs == "auto":
        return max(1, len(gpus))
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise ValueError(f"hydra.launcher.n_jobs must be auto or a positive number (got {n_jobs!r}).")
    if n_jobs > max(1, len(gpus)):
        have = f"{len(gpus)} GPUs are visible" if gpus else "this machine has no GPU"
        raise ValueError(
            f"hydra.launcher.n_jobs={n_jobs} but {have}, and each job at once needs a GPU of its own; "
            f"set hydra.launcher.n_jobs={max(1, len(gpus))} or auto."
        )
    return n_jobs


class IsolatedLauncher(Launcher):
    def __init__(self, n_jobs: int | str = "auto") -> None:
        self.n_jobs = n_jobs
        self._interrupted: list[int] = []  # SIGINTs that reached this process while jobs ran
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        gpus = visible_gpus()
        try:
            at_once = jobs_at_once(self.n_jobs, gpus)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        where = f"{at_once} at a time, one GPU each" if gpus else "one at a time"
        log.info(f"Launching {len(job_overrides)} jobs, one fresh process each, {where}, into {sweep_dir}")
        free: queue.Queue = queue.Queue()
        for gpu in gpus[:at_once] if gpus else [None]:
            free.put(gpu)
        jobs = list(enumerate(job_overrides, start=initial_job_idx))
        # A Ctrl-C reaches the jobs' processes too (the terminal signals the whole process group): each saves
        # a checkpoint and stops, and its SweepInterrupted comes back through its future. This process only
        # notes the signal meanwhile, and starts no further job.
        self._interrupted = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self._interrupted.append(signum))
        try:
            with ThreadPoolExecutor(max_workers=at_once) as threads:
                runs = [r for r in threads.map(lambda job: self._run_one(*job, free), jobs) if r is not None]
        finally:
            signal.signal(signal.SIGINT, previous)
        if self._interrupted:
            raise KeyboardInterrupt("SIGINT received")
        return runs

    def _run_one(self, idx: int, overrides: Sequence[str], free: queue.Queue) -> JobReturn | None:
        """One job in a fresh process, on a GPU taken from `free` (given back when the job ends); None when
        the sweep was interrupted before this job started."""
        gpu = free.get()
        try:
            if self._interrupted:
                return None
            log.info(
                f"\t#{idx} : {' '.join(filter_overrides(overrides))}"
                + (f"  (GPU {gpu})" if gpu is not None else "")
            )
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
                sweep_config.hydra.job.num = idx
            ret = JobReturn(
                overrides=list(overrides),
                cfg=sweep_config,
                task_name=str(sweep_config.hydra.job.name),
                working_dir=str(
                    Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
                ),
            )
            if sweep_config.get("train", {}).get("resume") and RunLayout(ret.working_dir).run_json.is_file():
                with open_dict(sweep_config):
                    sweep_config.hydra.output_subdir = (
                        None  # a resumed job is checked against its own saved config
                    )
            spawn = multiprocessing.get_context(
                "spawn"
            )  # a fresh interpreter: nothing inherited from this one
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                future = pool.submit(
                    _execute_job,
                    sweep_config,
                    self.hydra_context,
                    _task_address(self.task_function),
                    Singleton.get_state()["instances"],
                    list(sys.argv),
                    gpu,
                )
                try:
                    status, value = future.result()
                    ret.status = JobStatus[status]
                    ret.return_value = value if ret.status is JobStatus.COMPLETED else RuntimeError(value)
                except BrokenProcessPool:
                    message = "the job's process died before it could finish (killed, e.g. out of memory)"
                    log.error(f"job #{idx}: {message}; the sweep goes on")
                    _record_crash(Path(ret.working_dir), message)
                    # COMPLETED as far as Hydra is concerned, like a job whose error the task caught: the
                    # sweep goes on, and the report lists this job as failed from its run.json.
                    ret.status = JobStatus.COMPLETED
            return ret
        finally:
            free.put(gpu)
