"""`python -m qlora_lab +experiment=...`: compose the config, then run the stages it names, in order."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, register, validate
from .rundir import Run, inherit_from_run, is_main_process

register()
log = logging.getLogger("qlora_lab")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    run = Run(dir=job_dir, source=Path(cfg.run_dir).resolve() if cfg.run_dir else job_dir)
    try:
        if cfg.run_dir:
            cfg = inherit_from_run(cfg, run.source, list(hc.overrides.task))
            if (job_dir / ".hydra").is_dir() and is_main_process():
                OmegaConf.save(cfg, job_dir / ".hydra" / "config.yaml")  # what this job really used
        validate(cfg)
        run.start(cfg)
        from .pipelines import get_stage

        stages = [get_stage(name) for name in cfg.pipeline.stages]  # unknown names fail before any work
        for name, stage in zip(cfg.pipeline.stages, stages, strict=True):
            log.info("stage %s", name)
            stage(cfg, run)
    except (ConfigError, KeyboardInterrupt) as e:
        if run.info:
            run.finish(e)
        message = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"error: {message}", file=sys.stderr)
        if multirun:
            return  # the sweep goes on; the report lists this job as failed with its error
        sys.exit(2)
    except Exception as e:
        if run.info:
            run.finish(e)
        if multirun:
            log.exception("job failed")
            return
        raise
    run.finish()


if __name__ == "__main__":
    main()
