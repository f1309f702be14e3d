"""validate(): every rule a schema cannot express, for every stage the pipeline will run, checked once before
any data or model loads; each failure names the field and the fix. It is the single entry: the rules about one
part live with that part and are called from here (models: model and quantization; fused_lora, attention,
models: the `auto` knobs of training, whose one resolver both refuses an unmet explicit choice here and
decides in the stage).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from .config import Config, ConfigError, InferenceMode, MergeBase, QuantMethod, TrainConfig, WebConfig
from .distributed import world_size


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first rule `cfg` breaks."""
    from .attention import packed_varlen
    from .fused_lora import lora_unfused_reason, projections_ungrouped_reason
    from .layer_graphs import check_cuda_graphs
    from .models import check_lora_variant, check_model, check_quantization, liger_kernels, resolve_dtype
    from .sharded_loading import check_sharded_loading

    check_added_keys(cfg)
    check_stages(cfg)
    check_quantization(cfg)
    check_sizes(cfg)
    # the training knobs: each resolver refuses an explicit choice that cannot run here
    liger_kernels(cfg)
    lora_unfused_reason(cfg)
    projections_ungrouped_reason(cfg)
    packed_varlen(cfg, resolve_dtype(cfg.model.dtype))
    check_cuda_graphs(cfg)
    check_counts(cfg)
    check_lora_variant(cfg)
    check_sharded_loading(cfg)
    check_values(cfg)
    check_model(cfg.model)
    check_folders(cfg)
    check_stage_settings(cfg)
    check_run_dir(cfg)


def check_sizes(cfg: Config) -> None:
    """Batch and sizes that must be positive integers."""
    batch = cfg.train.batch_size
    if batch != "auto" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"train.batch_size must be a positive integer or auto (got {batch!r}).")
    for key, value in (
        ("lora.r", cfg.lora.r),
        ("train.grad_accum", cfg.train.grad_accum),
        ("train.checkpoint_every_n_layers", cfg.train.checkpoint_every_n_layers),
        ("train.loss_chunk_mem", cfg.train.loss_chunk_mem),
        ("dataset.max_seq_length", cfg.dataset.max_seq_length),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer (got {value}).")
    t = cfg.train
    if isinstance(t.uncheckpointed_layers, bool) or t.uncheckpointed_layers < 0:
        raise ConfigError(
            "train.uncheckpointed_layers must be 0 or a positive number of layers "
            f"(got {t.uncheckpointed_layers})."
        )
    if t.uncheckpointed_layers and not t.gradient_checkpointing:
        raise ConfigError(
            "train.uncheckpointed_layers exempts layers from gradient checkpointing, so it needs "
            "train.gradient_checkpointing=true; set that or drop train.uncheckpointed_layers."
        )
    if t.uncheckpointed_layers and t.checkpoint_every_n_layers != 1:
        raise ConfigError(
            "train.uncheckpointed_layers is one way to choose the checkpointed layers and "
            "train.checkpoint_every_n_layers another; keep one of them."
        )
    if t.activation_offload and not t.gradient_checkpointing:
        raise ConfigError(
            "train.activation_offload moves the checkpointed activations to the host, so it needs "
            "train.gradient_checkpointing=true; set that or drop train.activation_offload."
        )
    if t.embedding_on_host and world_size() > 1:
        raise ConfigError(
            "train.embedding_on_host=true is tried on one process only (each rank would keep its own table "
            "on the host); set train.embedding_on_host=false for a distributed run."
        )
    from . import layer_graphs  # its CUDA check, which the tests replace

    if t.activation_offload and "train" in cfg.pipeline.stages and not layer_graphs.gpu_available():
        raise ConfigError(
            "train.activation_offload moves activations from a GPU to pinned host memory and this machine "
            "has no CUDA GPU; set train.activation_offload=false."
        )


def check_counts(cfg: Config) -> None:
    """How much data and training."""
    if cfg.dataset.size is not None and cfg.dataset.size < 1:
        raise ConfigError(
            f"dataset.size must be a positive number of examples or null for all (got {cfg.dataset.size})."
        )
    if cfg.dataset.eval_size < 1:
        raise ConfigError(f"dataset.eval_size must be at least 1 (got {cfg.dataset.eval_size}).")
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("Set train.max_steps or train.epochs to a positive number.")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout}).")


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_web_access(w: WebConfig) -> None:
    """pipeline=web: a login wherever other machines can reach the app."""
    if w.auth is not None and not all(w.auth.partition(":")[::2]):
        raise ConfigError(
            "web.auth must be USER:PASSWORD (both non-empty), e.g. web.auth=me:long-secret; "
            "or leave it out on a loopback web.host."
        )
    if w.auth is None and not is_loopback(w.host):
        raise ConfigError(
            f"web.host={w.host} lets other machines reach the app, so it needs a login: add "
            f"web.auth=USER:PASSWORD, or keep the default web.host=127.0.0.1."
        )


def check_stages(cfg: Config) -> None:
    from .pipelines import STAGES

    unknown = [s for s in cfg.pipeline.stages if s not in STAGES]
    if unknown:
        raise ConfigError(
            f"pipeline.stages names an unknown stage {unknown[0]!r}; known stages: {', '.join(STAGES)}."
        )


def check_stage_settings(cfg: Config) -> None:
    """The settings of the stages this pipeline runs (a stage that does not run is not held to its
    settings)."""
    stages = set(cfg.pipeline.stages)
    if "compare" in stages and InferenceMode.adapter not in cfg.inference.modes:
        raise ConfigError(
            f"inference.modes={[m.value for m in cfg.inference.modes]} must include adapter, the "
            f"reference the other modes are compared with; add it."
        )
    if stages & {"merge", "export"}:  # export merges first when the run has no merged/ yet
        from transformers.utils.hub import convert_file_size_to_int

        try:
            convert_file_size_to_int(cfg.merge.max_shard_size)
        except ValueError:
            raise ConfigError(
                f"merge.max_shard_size={cfg.merge.max_shard_size!r} is not a size; write e.g. 2GB or 500MB."
            ) from None
        if cfg.merge.base is MergeBase.dequantized and cfg.quantization.method is QuantMethod.none:
            raise ConfigError(
                "merge.base=dequantized needs the run's quantization, but this run trained with "
                "quantization=none; use merge.base=original (the two are the same here)."
            )
    if "web" in stages and not 1 <= cfg.web.port <= 65535:
        raise ConfigError(
            f"web.port must be a TCP port from 1 to 65535 (got {cfg.web.port}); the default is 7860."
        )
    if "web" in stages:
        check_web_access(cfg.web)
    if "export" in stages:
        from .exports import export_targets

        export_targets(cfg.export)
        if cfg.export.measure and cfg.inference.agreement_examples < 1:
            raise ConfigError(
                f"inference.agreement_examples must be at least 1 to measure an export "
                f"(got {cfg.inference.agreement_examples}); or pass export.measure=false."
            )


def check_added_keys(cfg: Config) -> None:
    """`+lora.rank=8` adds a key the schema does not have: Hydra accepts it (its own typo hint suggests the
    `+`), and nothing would ever read it. Refuse it, pointing at the closest real field."""
    import dataclasses
    import difflib
    import typing

    def walk(node, schema: type, prefix: str):
        hints = typing.get_type_hints(schema)
        for key in node.keys():
            path = f"{prefix}{key}"
            if key not in hints:
                names = list(hints)
                close = [n for n in names if str(key).startswith(n) or n.startswith(str(key))][
                    :1
                ] or difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                hint = f"did you mean {prefix}{close[0]}?" if close else f"known fields: {', '.join(names)}."
                raise ConfigError(
                    f"{path} is not a field of the config (added with +{path}=...?), so nothing would "
                    f"read it; {hint}"
                )
            if dataclasses.is_dataclass(hints[key]) and OmegaConf.is_dict(node[key]):
                walk(node[key], hints[key], f"{path}.")

    walk(cfg, Config, "")


def check_values(cfg: Config) -> None:
    """Values that would only fail deep inside a library (a traceback after the model loaded)."""
    from transformers.trainer_utils import SchedulerType

    t, g = cfg.train, cfg.generation
    if OmegaConf.is_missing(cfg.dataset, "path"):
        raise ConfigError(
            f"dataset.path is not set (dataset={OmegaConf.select(cfg, 'dataset.name')} needs it); "
            f"give dataset.path=FILE (JSON, JSONL, CSV or Parquet)."
        )
    if not t.learning_rate > 0:
        raise ConfigError(f"train.learning_rate must be positive (got {t.learning_rate}).")
    schedulers = [s.value for s in SchedulerType]
    if t.scheduler not in schedulers:
        raise ConfigError(
            f"train.scheduler={t.scheduler} is not a transformers scheduler; use one of "
            f"{', '.join(schedulers)}."
        )
    check_optim_and_reporting(t)
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be 0 or more (got {t.warmup_steps}).")
    for key in ("logging_steps", "eval_steps", "save_steps", "save_total_limit"):
        value = getattr(t, key)
        if value is not None and value < 1:
            raise ConfigError(f"train.{key} must be a positive integer or null (got {value}).")
    if g.do_sample and not g.temperature > 0:
        raise ConfigError(
            f"generation.temperature must be positive when sampling (got {g.temperature}); "
            f"use generation=greedy for deterministic output."
        )
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p must be in (0, 1] (got {g.top_p}).")
    if not g.repetition_penalty > 0:
        raise ConfigError(f"generation.repetition_penalty must be positive (got {g.repetition_penalty}).")
    e = cfg.eval
    for key, value in (
        ("generation.max_new_tokens", g.max_new_tokens),
        ("inference.batch_size", cfg.inference.batch_size),
        ("inference.num_prompts", cfg.inference.num_prompts),
        ("eval.batch_size", cfg.eval.batch_size),
        ("eval.max_samples", cfg.eval.max_samples),
        ("eval.generation_batch_size", 1 if e.generation_batch_size is None else e.generation_batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer (got {value}).")
    if cfg.sweep.repeats < 1:
        raise ConfigError(f"sweep.repeats must be 1 or more seeds per cell (got {cfg.sweep.repeats}).")
    if cfg.train.auto_batch_start < 1:
        raise ConfigError(
            f"train.auto_batch_start must be a positive integer (got {cfg.train.auto_batch_start})."
        )
    cap = cfg.train.memory_cap_gib
    if cap is not None and cap <= 0:
        raise ConfigError(f"train.memory_cap_gib must be a positive number of GiB (got {cap}).")
    if cap is not None and cfg.train.batch_size != "auto":
        raise ConfigError(
            f"train.memory_cap_gib={cap} caps the batch search of train.batch_size=auto, but "
            f"train.batch_size={cfg.train.batch_size}; set train.batch_size=auto or drop the cap."
        )
    gpu_cap = cfg.train.gpu_memory_cap_gib
    if gpu_cap is not None and gpu_cap <= 0:
        raise ConfigError(f"train.gpu_memory_cap_gib must be a positive number of GiB (got {gpu_cap}).")
    if gpu_cap is not None:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            if gpu_cap > total:
                raise ConfigError(
                    f"train.gpu_memory_cap_gib={gpu_cap} is more than this GPU's {total:.1f} GiB, so it caps "
                    f"nothing; lower it or drop it."
                )
    if cfg.sweep.equal_memory and cfg.train.batch_size == "auto" and cap is None:
        raise ConfigError(
            "sweep.equal_memory compares QLoRA with LoRA at LoRA's batch, which must be fixed, but "
            "train.batch_size=auto; set train.batch_size to a number."
        )
    if g.top_k < 0 or g.no_repeat_ngram_size < 0:
        raise ConfigError("generation.top_k and generation.no_repeat_ngram_size must be 0 or more.")


def folder_problem(path: str | Path) -> str | None:
    """Why `path` cannot be (or be created as) a folder: a file in its place or above it."""
    p = Path(path).expanduser().absolute()
    for ancestor in (p, *p.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                return f"{ancestor} is a file, not a folder" if ancestor == p else f"{ancestor} is a file"
            return None
    return None


def check_folders(cfg: Config) -> None:
    """The folders this job writes into (Hydra's run folder is claimed earlier, see callbacks.RunDirGuard)."""
    env = os.environ.get("QLORA_LAB_CACHE")
    for key, path in (("paths.output_dir", cfg.paths.output_dir), ("paths.cache_dir", cfg.paths.cache_dir)):
        problem = folder_problem(path)
        if problem:
            named = (
                f"QLORA_LAB_CACHE={env}" if key == "paths.cache_dir" and env == str(path) else f"{key}={path}"
            )
            raise ConfigError(
                f"{named} cannot hold folders: {problem}; point it at a folder (or a path that does "
                f"not exist yet)."
            )


# train.report_to names whose PyPI package is not the integration's own name
REPORTING_PACKAGES = {
    "azure_ml": "azureml-core",
    "neptune": "neptune",
    "dagshub": "dagshub mlflow",
    "flyte": "flytekitplugins-deck-standard",
    "kubeflow": "kubeflow-training",
}


def check_optim_and_reporting(t: TrainConfig) -> None:
    """train.optim and train.report_to as transformers reads them: an unknown name or a missing package would
    only fail once the model has loaded."""
    import difflib

    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )
    from transformers.training_args import OptimizerNames

    optims = ["auto", *(o.value for o in OptimizerNames)]
    if t.optim not in optims:
        close = difflib.get_close_matches(str(t.optim), optims, n=1, cutoff=0.4)
        hint = f"did you mean {close[0]}? Others: " if close else "use e.g. "
        raise ConfigError(
            f"train.optim={t.optim} is not a transformers optimizer; {hint}auto, adamw_torch, "
            f"adamw_torch_fused, paged_adamw_8bit, adafactor, sgd (all: transformers' OptimizerNames)."
        )
    available = get_available_reporting_integrations()
    for name in t.report_to:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(
                f"train.report_to has {name!r}, which transformers does not know; use any of "
                f"{', '.join(INTEGRATION_TO_CALLBACK)}, or train.report_to=[] for none."
            )
        if name not in available:
            package = REPORTING_PACKAGES.get(name, name.replace("_", "-"))
            raise ConfigError(
                f"train.report_to has {name!r}, but its package is not installed; `pip install "
                f"{package}` (into .venv), or drop it from train.report_to (e.g. "
                f"train.report_to=[tensorboard])."
            )


def check_run_dir(cfg: Config) -> None:
    """A stage acts on exactly one run: the one it trains, or the one named by run_dir, never a mix."""
    stages = f"[{','.join(cfg.pipeline.stages)}]"
    if cfg.train.resume and "train" not in cfg.pipeline.stages:
        raise ConfigError(
            f"train.resume=true continues a training run, but pipeline.stages={stages} has no train "
            f"stage; drop train.resume."
        )
    if cfg.train.resume and not cfg.run_dir:
        raise ConfigError("train.resume=true needs run_dir=RUN, the run folder to continue.")
    if cfg.run_dir and "train" in cfg.pipeline.stages and not cfg.train.resume:
        raise ConfigError(
            f"run_dir={cfg.run_dir} names an earlier run, but pipeline.stages={stages} starts by "
            f"training a new adapter; add train.resume=true to continue that run, drop the train "
            f"stage (e.g. pipeline.stages=[{','.join(s for s in cfg.pipeline.stages if s != 'train')}]) to "
            "use its adapter, or drop run_dir to train a new run."
        )
