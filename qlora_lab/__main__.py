"""`python -m qlora_lab +experiment=...`: compose the config, then run the stages it names, in order."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, register
from .layout import RunLayout
from .rundir import Run, explain_inherited, hold_run_dir, inherit_from_run, is_main_process
from .validation import validate

register()
log = logging.getLogger("qlora_lab")


def preflight(cfg: DictConfig) -> None:
    """Read the input files the stages will need, so that a bad one stops the run before any model loads."""
    from .data import load_splits
    from .models import check_model_files, check_safetensors

    stages = set(cfg.pipeline.stages)
    if cfg.model.trust_remote_code:
        source = (
            cfg.model.name_or_path
            if not cfg.model.tokenizer
            else f"{cfg.model.name_or_path} and {cfg.model.tokenizer}"
        )
        print(
            f"warning: model.trust_remote_code=true runs the Python code shipped in {source} in this "
            "process; use it only for a folder or repository you trust.",
            file=sys.stderr,
            flush=True,
        )
    check_model_files(cfg)
    adapter = RunLayout(cfg.run_dir).adapter if cfg.run_dir and not cfg.train.resume else None
    if adapter is not None and adapter.is_dir():  # the adapter every later stage of that run loads
        check_safetensors(
            adapter, f"run_dir={cfg.run_dir}", "train the run again, or restore the file from a copy."
        )
    # merge and export measure agreement with the trained model on eval prompts and examples
    needs_data = {"train", "evaluate", "compare", "merge"} | ({"export"} if cfg.export.measure else set())
    if stages & needs_data or (stages & {"infer"} and not cfg.inference.prompts_file):
        load_splits(cfg)
    if stages & {"infer", "compare"} and cfg.inference.prompts_file:
        from .pipelines.infer import read_prompt_rows

        read_prompt_rows(cfg.inference.prompts_file, cfg.paths.root, cfg)


def disk_space_for(name: str, cfg: DictConfig, run: Run):
    """What a full disk during stage `name` should say: the folder, the space needed where it can be known (a
    checkpoint like the last one; the base model's weight files for a merge; the weight count times each
    export's bytes per weight), the leftovers removed, and the command that continues."""
    from .exports import export_targets
    from .models import looks_local, model_path, weight_count
    from .rundir import disk_space

    def files_bytes(folder: Path, pattern: str = "*.safetensors") -> int | None:
        return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file()) or None

    source = run.source
    if name == "train":

        def checkpoint_bytes():
            last = Path(run.last_checkpoint) if run.last_checkpoint else None
            return files_bytes(last, "*") if last and last.is_dir() else None

        return disk_space(
            run.dir,
            "the training run",
            f"continue with `python -m qlora_lab train.resume=true "
            f"run_dir={run.dir}` (it starts from the last complete checkpoint)",
            checkpoint_bytes,
        )

    def base_bytes():  # a merged model takes about the space of the base model's weight files
        base = model_path(cfg)
        return files_bytes(Path(base)) if looks_local(base) else None

    def merged_tmp():
        return [p for p in [RunLayout(source).merged_tmp] if p.exists()]

    if name == "merge":
        return disk_space(
            source,
            "merged/",
            f"merge again with `python -m qlora_lab pipeline=merge run_dir={source}`",
            base_bytes,
            merged_tmp,
        )
    if name == "export":
        again = f"export again with `python -m qlora_lab pipeline=export run_dir={source}`"

        def export_tmp():
            return sorted(RunLayout(source).export.glob("*.tmp"))

        if not RunLayout(source).merged_config.is_file():  # the export stage merges first
            return disk_space(
                source,
                "merged/ and the export (an export merges first)",
                again,
                base_bytes,
                lambda: merged_tmp() + export_tmp(),
            )

        def export_bytes():
            weights = weight_count(RunLayout(source).merged)
            return (
                int(
                    sum(
                        spec.bytes_per_weight(variant) * weights
                        for spec, variant in export_targets(cfg.export)
                    )
                )
                or None
            )

        return disk_space(RunLayout(source).export, "the export", again, export_bytes, export_tmp)
    return disk_space(run.dir, f"the {name} stage's results", "run it again")


def checked_config(cfg: DictConfig, job_dir: Path, overrides: list[str]) -> DictConfig | None:
    """The config this job really runs, every rule checked and every input file read, before any model loads:
    the run's own config when resuming (None: it already completed), the fields taken from run_dir
    otherwise."""
    from .resume import resume_config

    inherited: list[str] = []
    try:
        if cfg.train.resume and cfg.run_dir:
            cfg = resume_config(cfg, Path(cfg.run_dir), job_dir, overrides)
            if cfg is None:
                return None
        elif cfg.run_dir:
            cfg, inherited = inherit_from_run(cfg, Path(cfg.run_dir).resolve(), overrides)
        validate(cfg)
        preflight(cfg)
    except ConfigError as e:
        if inherited:
            raise ConfigError(explain_inherited(str(e), inherited, cfg.run_dir)) from None
        raise
    return cfg


def close_progress_bars() -> None:
    """Close the progress bars a stopped stage left open (the Trainer's, a download's), so that the message
    that follows starts a line of its own instead of trailing the bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def record_ending(run: Run, cfg: DictConfig, error: BaseException, resume: bool) -> None:
    """run.json's ending. Every job past composition leaves a record (a resumed run keeps its own). On a full
    disk this write may fail too: the one-line message about the disk matters more than a traceback about
    run.json."""
    from .rundir import disk_full

    close_progress_bars()
    try:
        if not run.info and not resume:
            run.start(cfg)
        if run.info:
            run.finish(error)
    except OSError as e:
        if not disk_full(e):
            raise
        log.warning("could not record the run's ending in %s: %s", RunLayout(run.dir).run_json, e)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the job; return its objective (cfg.objective.metric from metrics.json), None when it failed or has
    none: a search (hydra/sweeper=optuna) records such a trial as failed and goes on."""
    from .resume import SweepInterrupted, install_signal_handlers, job_to_resume, sweep_resume_command

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    overrides = list(hc.overrides.task)
    install_signal_handlers()
    if cfg.train.resume and multirun and not cfg.run_dir:
        cfg = job_to_resume(cfg, job_dir)
    resume = bool(cfg.train.resume and cfg.run_dir)
    run = Run(dir=job_dir, source=Path(cfg.run_dir).resolve() if cfg.run_dir else job_dir)
    try:
        if is_main_process():
            hold_run_dir(job_dir)  # before reading its run.json: two resumes of one run must not both go on
        checked = checked_config(cfg, job_dir, overrides)
        if checked is None:
            print(f"{cfg.run_dir} already completed: nothing to resume.", flush=True)
            from .rundir import read_json

            return read_json(RunLayout(cfg.run_dir).metrics_json).get(cfg.objective.metric)
        cfg = checked
        if cfg.run_dir and not resume and RunLayout(job_dir).hydra.is_dir() and is_main_process():
            OmegaConf.save(cfg, RunLayout(job_dir).config)  # what this job really used
        run.start(cfg, resume=resume)
        from .pipelines import get_stage

        stages = [get_stage(name) for name in cfg.pipeline.stages]
        for name, stage in zip(cfg.pipeline.stages, stages, strict=True):
            log.info("stage %s", name)
            with disk_space_for(name, cfg, run):
                stage(cfg, run)
    except (ConfigError, KeyboardInterrupt) as e:
        record_ending(run, cfg, e, resume)
        if isinstance(e, KeyboardInterrupt):
            where = f" at step {run.step}" if run.step is not None else ""
            if (
                multirun
            ):  # the sweep stops here; run_cli prints this line (the isolated launcher passes it up)
                raise SweepInterrupted(
                    f"interrupted{where} in job #{hc.job.num} ({e or 'KeyboardInterrupt'}); "
                    f"resume the sweep with: {sweep_resume_command(hc.sweep.dir)}"
                ) from None
            again = (
                f"; resume with: python -m qlora_lab train.resume=true run_dir={run.dir}"
                if run.last_checkpoint
                else ""
            )
            print(f"interrupted{where} ({e or 'KeyboardInterrupt'}){again}", file=sys.stderr, flush=True)
            sys.exit(130)
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            return None  # the sweep goes on; the report lists this job as failed with its error
        sys.exit(2)
    except Exception as e:
        record_ending(run, cfg, e, resume)
        if multirun:
            log.exception("job failed")
            return None
        raise
    run.finish()
    objective = run.metrics.get(cfg.objective.metric)
    if objective is None and multirun:  # a search needs it; a single chat, infer or web run has none to give
        log.warning(
            "objective.metric=%s is not among this run's metrics (%s): no objective to return",
            cfg.objective.metric,
            ", ".join(sorted(k for k in run.metrics if "/" in k)),
        )
    return objective


def run_cli() -> None:
    """The command: Hydra's main, and one line instead of a traceback for a Ctrl-C that no job handles itself
    (on a sweep: between jobs, or in the launching process while a job runs in its own)."""
    from .callbacks import SWEEP

    try:
        main()
    except KeyboardInterrupt as e:
        from .resume import SweepInterrupted, sweep_resume_command

        if isinstance(e, SweepInterrupted):
            print(e, file=sys.stderr, flush=True)
        else:
            again = f"; resume the sweep with: {sweep_resume_command(SWEEP['dir'])}" if SWEEP["dir"] else ""
            print(f"interrupted ({e or 'KeyboardInterrupt'}){again}", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    run_cli()
