"""`python -m qlora_lab +experiment=...`: compose the config, then run the stages it names, in order."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, register, validate
from .rundir import Run, explain_inherited, inherit_from_run, is_main_process

register()
log = logging.getLogger("qlora_lab")


def preflight(cfg: DictConfig) -> None:
    """Read the input files the stages will need, so that a bad one stops the run before any model loads."""
    from .data import load_splits

    stages = set(cfg.pipeline.stages)
    if cfg.model.trust_remote_code:
        source = cfg.model.name_or_path if not cfg.model.tokenizer else f"{cfg.model.name_or_path} and {cfg.model.tokenizer}"
        print(f"warning: model.trust_remote_code=true runs the Python code shipped in {source} in this process; "
              f"use it only for a folder or repository you trust.", file=sys.stderr, flush=True)
    # merge and export measure agreement with the trained model on eval prompts and examples
    needs_data = {"train", "evaluate", "compare", "merge"} | ({"export"} if cfg.export.measure else set())
    if stages & needs_data or (stages & {"infer"} and not cfg.inference.prompts_file):
        load_splits(cfg)
    if stages & {"infer", "compare"} and cfg.inference.prompts_file:
        from .pipelines.infer import read_prompt_rows

        read_prompt_rows(cfg.inference.prompts_file, cfg.paths.root, cfg)


def checked_config(cfg: DictConfig, job_dir: Path, overrides: list[str]) -> DictConfig | None:
    """The config this job really runs, every rule checked and every input file read, before any model loads:
    the run's own config when resuming (None: it already completed), the fields taken from run_dir otherwise."""
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the job; return its objective (cfg.objective.metric from metrics.json), None when it failed or has none:
    a search (hydra/sweeper=optuna) records such a trial as failed and goes on."""
    from .resume import install_signal_handlers, job_to_resume

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
        checked = checked_config(cfg, job_dir, overrides)
        if checked is None:
            print(f"{cfg.run_dir} already completed: nothing to resume.", flush=True)
            from .rundir import read_json

            return read_json(Path(cfg.run_dir) / "metrics.json").get(cfg.objective.metric)
        cfg = checked
        if cfg.run_dir and not resume and (job_dir / ".hydra").is_dir() and is_main_process():
            OmegaConf.save(cfg, job_dir / ".hydra" / "config.yaml")  # what this job really used
        run.start(cfg, resume=resume)
        from .pipelines import get_stage

        stages = [get_stage(name) for name in cfg.pipeline.stages]
        for name, stage in zip(cfg.pipeline.stages, stages, strict=True):
            log.info("stage %s", name)
            stage(cfg, run)
    except (ConfigError, KeyboardInterrupt) as e:
        if not run.info and not resume:
            run.start(cfg)  # every job past composition leaves a record (a resumed run keeps its own)
        if run.info:
            run.finish(e)
        if isinstance(e, KeyboardInterrupt):
            where = f" at step {run.step}" if run.step is not None else ""
            again = f"; resume with: python -m qlora_lab train.resume=true run_dir={run.dir}" \
                if run.last_checkpoint else ""
            print(f"interrupted{where} ({e or 'KeyboardInterrupt'}){again}", file=sys.stderr, flush=True)
            if multirun:
                return None
            sys.exit(130)
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            return None  # the sweep goes on; the report lists this job as failed with its error
        sys.exit(2)
    except Exception as e:
        if not run.info and not resume:
            run.start(cfg)
        if run.info:
            run.finish(e)
        if multirun:
            log.exception("job failed")
            return None
        raise
    run.finish()
    objective = run.metrics.get(cfg.objective.metric)
    if objective is None and multirun:  # a search needs it; a single chat, infer or web run has none to give
        log.warning("objective.metric=%s is not among this run's metrics (%s): no objective to return",
                    cfg.objective.metric, ", ".join(sorted(k for k in run.metrics if "/" in k)))
    return objective


if __name__ == "__main__":
    main()
