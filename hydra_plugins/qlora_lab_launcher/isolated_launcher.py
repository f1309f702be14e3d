"""`hydra/launcher=isolated`: run a sweep's jobs one after another, each in a fresh Python process.

Why not Hydra's joblib launcher: with n_jobs=1 joblib runs every job in the launching process, and with
n_jobs>1 its workers are reused across jobs and run side by side. Either way a job's peak RSS, allocator
state and timing carry over from the jobs before it. A fresh `spawn`ed process per job, run alone, gives each
job clean memory and time figures. Everything else follows Hydra's BasicLauncher.

Kept free of heavy imports: Hydra imports every plugin module on every start.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import multiprocessing
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
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

log = logging.getLogger(__name__)


def _task_address(fn: TaskFunction) -> tuple[str, str]:
    """Where the child finds the task function again. `python -m pkg` runs pkg/__main__.py as `__main__`, which
    spawn does not re-run in the child: import it by its real name there."""
    module = fn.__module__
    spec = getattr(sys.modules.get(module), "__spec__", None)
    return (spec.name if module == "__main__" and spec is not None else module), fn.__qualname__


def _task_function(module: str, qualname: str) -> TaskFunction:
    """The undecorated task function, imported in the child (which also registers the app's resolvers)."""
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return inspect.unwrap(fn)  # @hydra.main wraps it; Hydra calls the function inside


def _execute_job(sweep_config: DictConfig, hydra_context: HydraContext, task: tuple[str, str], singletons: dict,
                 argv: list[str]) -> tuple[str, Any]:
    """Runs in the child process: what Hydra's own launchers do for one job. Returns (status, value or error)."""
    sys.argv = argv  # run.json records the sweep's command, not multiprocessing's
    task_function = _task_function(*task)
    setup_globals()
    # OmegaConf resolvers are closures that pickle cannot carry; the child has its own: Hydra's (setup_globals)
    # and the app's, registered again when _task_function imported the app's module.
    Singleton.set_state({"instances": singletons, "omegaconf_resolvers": BaseContainer._resolvers})
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    # A JobReturn holds Hydra's config classes, which pickle cannot send back: send back what the sweeper reads.
    if ret.status is JobStatus.COMPLETED:
        return "COMPLETED", ret.return_value
    return "FAILED", f"{type(ret._return_value).__name__}: {ret._return_value}"


def _record_crash(job_dir: Path, message: str) -> None:
    """A process that died (killed, out of memory) could not write its own ending: write it into run.json."""
    path = job_dir / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(status="failed", error=message)
    job_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")


class IsolatedLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs, one fresh process each, one at a time, into {sweep_dir}")
        task = _task_address(self.task_function)
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from this one
        runs = []
        interrupted: list[int] = []  # SIGINTs that reached this process while a job ran
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
                sweep_config.hydra.job.num = idx
            ret = JobReturn(overrides=list(overrides), cfg=sweep_config, task_name=str(sweep_config.hydra.job.name),
                            working_dir=str(Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)))
            if sweep_config.get("train", {}).get("resume") and (Path(ret.working_dir) / "run.json").is_file():
                with open_dict(sweep_config):
                    sweep_config.hydra.output_subdir = None  # a resumed job is checked against its own saved config
            # A Ctrl-C reaches the job's process too (the terminal signals the whole process group): it saves a
            # checkpoint and stops, and its SweepInterrupted comes back through future.result(). This process only
            # notes the signal meanwhile, and starts no further job.
            previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
            try:
                with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    future = pool.submit(_execute_job, sweep_config, self.hydra_context, task,
                                         Singleton.get_state()["instances"], list(sys.argv))
                    try:
                        status, value = future.result()
                        ret.status = JobStatus[status]
                        ret.return_value = value if ret.status is JobStatus.COMPLETED else RuntimeError(value)
                    except BrokenProcessPool:
                        message = "the job's process died before it could finish (killed, e.g. out of memory)"
                        log.error(f"job #{idx}: {message}; the sweep goes on")
                        _record_crash(Path(ret.working_dir), message)
                        # COMPLETED as far as Hydra is concerned, like a job whose error the task caught: the sweep
                        # goes on, and the report lists this job as failed from its run.json.
                        ret.status = JobStatus.COMPLETED
            finally:
                signal.signal(signal.SIGINT, previous)
            runs.append(ret)
            if interrupted:
                raise KeyboardInterrupt("SIGINT received")
        return runs
