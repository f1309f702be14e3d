"""Interrupted runs: checkpoints to resume from, a clean stop on Ctrl-C / SIGTERM, and `train.resume=true
run_dir=RUN`.

The Trainer already saves and restores everything a resumed run needs (adapter, optimizer, scheduler, RNG
states, the position in the data order) through `save_steps` and `train(resume_from_checkpoint=...)`. What it
does not do, and this module adds:
  - mark a checkpoint complete only once every file is written (a SIGKILL mid-save leaves an unmarked folder,
    which resuming ignores and removes), and record it in run.json at once;
  - on the first Ctrl-C or SIGTERM during training, finish the current step, save a checkpoint and stop
    (a second one stops at once), so that the run ends `interrupted` with its step and checkpoint;
  - take the run's own config back, refusing a command line that would change it.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from .config import Config, ConfigError
from .layout import RunLayout
from .rundir import Run, inherit_from_run, named_on_command_line, override_keys, read_json, run_status

log = logging.getLogger(__name__)

COMPLETE = "qlora_lab_complete"  # written into a checkpoint folder after everything else in it


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: recorded as `interrupted` (not `failed`) with the step and the last checkpoint."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C on a sweep: the job in progress ended `interrupted` and no further job starts. The message is
    the one line printed, with the command that resumes the sweep."""


def sweep_resume_command(sweep_dir: str | Path) -> str:
    """This sweep's command line again, continuing in its folder (completed jobs are skipped)."""
    import shlex
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.sweep.dir=", "train.resume="))]
    return " ".join(
        [
            "python -m qlora_lab",
            *map(shlex.quote, args),
            shlex.quote(f"hydra.sweep.dir={sweep_dir}"),
            "train.resume=true",
        ]
    )


class _Stop:
    requested: str | None = None  # the signal's name once one arrived during training
    training: bool = False  # inside the training loop: stop at the end of the step, not at once


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _Stop.training and _Stop.requested is None:
        _Stop.requested = name
        print(
            f"\n{name}: saving a checkpoint at the end of this step, then stopping (again to stop at once)",
            flush=True,
        )
        return
    raise Interrupted(f"{name} received")


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM both end a run as `interrupted` (SIGTERM is what Slurm and `kill` send)."""
    _Stop.requested, _Stop.training = None, False
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`; incomplete ones (the process died while saving) are
    removed."""
    if not folder.is_dir():
        return None
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for path in reversed(found):
        if (path / COMPLETE).is_file():
            return path
        log.warning("removing %s: its save never finished", path)
        shutil.rmtree(path)
    return None


class Progress(TrainerCallback):
    """Keeps run.json's step and last checkpoint true, marks checkpoints complete, stops cleanly on a
    signal."""

    def __init__(self, run: Run):
        self.run = run

    def on_train_begin(self, args, state, control, **kwargs):
        _Stop.training = True

    def on_train_end(self, args, state, control, **kwargs):
        _Stop.training = False

    def on_step_end(self, args, state, control, **kwargs):
        self.run.progress(step=state.global_step)
        if _Stop.requested:
            control.should_save = True  # saved by the Trainer right after this callback; on_save then stops
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.process_index == 0 and folder.is_dir():
            (folder / COMPLETE).write_text(f"{state.global_step}\n")
            self.run.progress(checkpoint=str(folder))
        if _Stop.requested:
            _Stop.training = False
            raise Interrupted(
                f"{_Stop.requested} received at step {state.global_step}; checkpoint {folder} saved"
            )


def job_to_resume(cfg: DictConfig, job_dir: Path) -> DictConfig:
    """A resumed sweep (`-m ... hydra.sweep.dir=S train.resume=true`): each job continues its own folder if an
    earlier attempt left one (run.json), and starts fresh if not."""
    if RunLayout(job_dir).run_json.is_file():
        cfg.run_dir = str(job_dir)
    else:
        cfg.train.resume = False
    return cfg


def resume_config(cfg: DictConfig, run_dir: Path, job_dir: Path, overrides: list[str]) -> DictConfig | None:
    """The config of the run being resumed, or None when it already completed. Refuses a changed value."""
    if run_dir.resolve() != job_dir.resolve():
        raise ConfigError(
            f"train.resume=true trains into run_dir={run_dir} itself, but this job's folder is "
            f"{job_dir}; drop hydra.run.dir."
        )
    status, _ = run_status(read_json(RunLayout(run_dir).run_json))
    if status == "running":
        info = read_json(RunLayout(run_dir).run_json)
        raise ConfigError(
            f"run_dir={run_dir} is still running (pid {info.get('pid')} on "
            f"{info.get('hardware', {}).get('host')}); stop it before resuming it."
        )
    keys = [k for k in Config.__dataclass_fields__ if k not in ("run_dir", "paths")]
    # `+experiment=...` sets fields the command line does not list: then every field counts as named and must
    # match
    keys_named = override_keys(overrides)
    global_groups = any("." not in k and k not in cfg for k in keys_named)
    groups, _ = named_on_command_line(cfg, overrides)
    resumed, _ = inherit_from_run(cfg, run_dir, overrides, keys=keys, all_named=global_groups)
    saved, _ = inherit_from_run(cfg, run_dir, [], keys=keys)
    new, old = (_flat(OmegaConf.to_container(c, enum_to_str=True)) for c in (resumed, saved))
    for key in sorted(set(new) | set(old)):
        if key in ("run_dir", "train.resume") or key.startswith("paths.") or new.get(key) == old.get(key):
            continue
        group = key.split(".", 1)[0]
        named = f"{group}=..." if group in groups else "+experiment=..." if global_groups else key
        raise ConfigError(
            f"{key}={new.get(key)} differs from the run being resumed (run_dir={run_dir} has "
            f"{key}={old.get(key)}); a resumed run keeps its own config: drop {named} from the "
            f"command line, or start a new run."
        )
    return None if status == "completed" else resumed


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}
