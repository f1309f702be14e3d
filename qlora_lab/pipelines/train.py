"""Train: data -> base model (quantized or not) -> LoRA -> Trainer -> adapter/ + metrics.

Reads top to bottom like a recipe: setup, data, model, loop, save.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..attention import packed_varlen, use_varlen
from ..config import Config, ConfigError, LoraInit, Precision, QuantMethod
from ..data import PackedCollator, file_sha256, load_splits, mean_context, tokenize_split
from ..distributed import cap_gpu_memory, fsdp_enabled, is_main_process, one_gpu_per_process
from ..fused_lora import (
    fuse_lora,
    fuse_swiglu_down,
    group_projections,
    keep_no_weight_unless_checkpointed,
    lora_unfused_reason,
    projections_ungrouped_reason,
    swiglu_mlps,
)
from ..host_embedding import HostEmbedding
from ..layer_graphs import install as install_layer_graphs
from ..layout import RunLayout
from ..models import (
    attach_lora,
    checkpointing_layers,
    count_params,
    liger_kernels,
    load_model,
    load_tokenizer,
    memory_footprint_gib,
    model_path,
    tokenizer_path,
)
from ..perf import flops_per_token, peak_tflops, step_time_spread
from ..recomputed_norms import recompute_norms
from ..resume import Progress, last_checkpoint
from ..rundir import Run, peak_memory_gib, reset_peak_memory
from ..sharded_loading import load_sharded, sharded_loading
from ..sharded_loss import use_sharded_head_loss

log = logging.getLogger(__name__)
PROFILE_STEPS = 3  # train.profile: optimizer steps recorded


class StepTimer(TrainerCallback):
    """Wall time and real (non-padding) tokens of every optimizer step.

    On a GPU each step's start and end are CUDA events on the training stream, read back only when the times
    are asked for (an evaluation, the summary): a step time is the device's, from the moment the step's first
    work could start to the end of its optimizer update. A synchronize at every step boundary would instead
    leave the GPU idle while the host fetches the next batch and issues its first kernels.

    Written by hand because the Trainer's own train_runtime includes evaluation, logging and warm-up.
    """

    def __init__(self):
        self._step_s: list[float] = []
        self._pending: list[tuple] = []  # (start, end) marks of steps not yet read back
        self.step_tokens: list[int] = []
        self._start = None
        self._seen = 0

    @staticmethod
    def _mark():
        if not torch.cuda.is_available():
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @property
    def step_s(self) -> list[float]:
        for start, end in self._pending:
            if isinstance(end, float):
                self._step_s.append(end - start)
            else:
                end.synchronize()
                self._step_s.append(start.elapsed_time(end) / 1000)
        self._pending = []
        return self._step_s

    def on_train_begin(self, args, state, control, **kwargs):
        # train.batch_size=auto restarts the loop with a smaller batch after an out-of-memory error
        self._step_s, self._pending, self.step_tokens = [], [], []
        self._seen = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._pending.append((self._start, self._mark()))
        self.step_tokens.append(state.num_input_tokens_seen - self._seen)
        self._seen = state.num_input_tokens_seen

    def summary(self, skip: int, samples_per_step: int, world_size: int) -> dict:
        """Speed over the steps after the first `skip` (all steps if there are not more than that)."""
        step_s = self.step_s
        s, t = (step_s[skip:], self.step_tokens[skip:]) if len(step_s) > skip else (step_s, self.step_tokens)
        if not s:
            return {}
        return {
            "train/tokens_per_s": sum(t) / sum(s),
            "train/tokens_per_s_per_gpu": sum(t) / sum(s) / world_size,
            "train/samples_per_s": samples_per_step * len(s) / sum(s),
            "train/timed_steps": len(s),
            "train/timed_tokens": sum(t),
            "train/step_times_s": [round(x, 4) for x in s],
        } | step_time_spread(s)


class EvalCurve(TrainerCallback):
    """Every evaluation (the one before training, every train.eval_steps, the final one) as a point of the
    learning curve: step, real tokens trained on, seconds in optimizer steps so far (the StepTimer's:
    evaluation and logging left out) and eval loss. The sweep report draws these and reads time and tokens to
    a target loss."""

    def __init__(self, timer: StepTimer):
        self.timer, self.points = timer, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.points = []  # train.batch_size=auto restarts the loop after an out-of-memory error

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            point = {
                "step": state.global_step,
                "tokens": state.num_input_tokens_seen,
                "train_s": round(sum(self.timer.step_s), 4),
                "loss": metrics["eval_loss"],
            }
            self.points = [p for p in self.points if p["step"] != point["step"]] + [point]


class MemoryCap(TrainerCallback):
    """train.memory_cap_gib with train.batch_size=auto: a step whose peak memory, measured as the report
    measures it (peak_memory_gib), is over the cap counts as out of memory, so the Trainer's batch search
    (accelerate's find_executable_batch_size, 0.9x the batch each time) tries a smaller batch. Every attempt
    starts from the same adapter weights (an attempt over the cap has already taken an optimizer step) and
    with a fresh peak."""

    def __init__(self, cap_gib: float, model):
        self.cap, self.model = cap_gib, model
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.over: list[dict] = []  # the attempts over the cap: batch and peak

    def on_train_begin(self, args, state, control, **kwargs):
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.start:
                    param.copy_(self.start[name])
        reset_peak_memory()

    def on_step_end(self, args, state, control, **kwargs):
        peak = peak_memory_gib()
        if peak <= self.cap:
            return
        batch = state.train_batch_size
        self.over.append({"batch": batch, "peak_gib": round(peak, 4)})
        if batch <= 1:
            raise ConfigError(
                f"no batch fits under train.memory_cap_gib={self.cap}: batch 1 peaked at {peak:.3f} GiB; "
                f"raise the cap (or shorten dataset.max_seq_length)."
            )
        # the one-argument RuntimeError naming " out of memory." that accelerate's search takes for an OOM
        raise RuntimeError(
            f"batch {batch} peaked at {peak:.3f} GiB, over train.memory_cap_gib={self.cap}: out of memory."
        )


def utilisation(metrics: dict, model, trainable: int, context: float, peak_override: float | None) -> dict:
    """Model FLOPs per token and, on a GPU with a known peak, MFU (formula in qlora_lab/perf.py)."""
    per_gpu = metrics.get("train/tokens_per_s_per_gpu")
    if per_gpu is None:
        return {}
    flops = flops_per_token(model.config, trainable, context)
    out = {
        "perf/flops_per_token": flops,
        "perf/mean_context": context,
        "perf/model_tflops_per_s_per_gpu": per_gpu * flops / 1e12,
    }
    peak, source = peak_tflops(peak_override)
    if peak:
        out |= {
            "perf/peak_tflops": peak,
            "perf/peak_source": source,
            "perf/mfu": per_gpu * flops / 1e12 / peak,
        }
    return out


class StepProfiler(TrainerCallback):
    """train.profile: torch.profiler over PROFILE_STEPS optimizer steps after the warm-up; writes profile.txt
    (ops by total device time, then by CPU time) and a Chrome trace (profile_trace.json) into the run dir."""

    def __init__(self, out_dir, start: int):
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.out_dir, self.start = out_dir, start
        self.prof = profile(
            activities=activities, schedule=schedule(wait=start, warmup=1, active=PROFILE_STEPS)
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self.prof.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.prof.step()
        if state.global_step == self.start + 1 + PROFILE_STEPS:
            self.prof.stop()
            device_sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            table = self.prof.key_averages()
            RunLayout(self.out_dir).profile_txt.write_text(
                table.table(sort_by=device_sort, row_limit=40)
                + "\n"
                + table.table(sort_by="cpu_time_total", row_limit=40)
            )
            self.prof.export_chrome_trace(str(RunLayout(self.out_dir).profile_trace))


def check_ranks_agree(model, world_size: int, load_peak: float | None = None) -> dict:
    """Distributed runs: gather every rank's adapter digest, peak memory and load peak. DDP must leave
    identical adapters; FSDP ranks hold different shards by design, so only their memory is compared."""
    from accelerate.utils import gather_object

    fsdp = fsdp_enabled()
    h = hashlib.sha256()
    for name, param in [] if fsdp else sorted(model.named_parameters()):
        if param.requires_grad:
            h.update(name.encode() + param.detach().float().cpu().numpy().tobytes())
    gathered = gather_object([(h.hexdigest(), peak_memory_gib(), load_peak)])
    out = {
        "distributed/world_size": world_size,
        "distributed/strategy": "fsdp" if fsdp else "ddp",
        "memory/peak_gib_per_rank": [p for _, p, _ in gathered],
        "memory/load_peak_gib_per_rank": [p for _, _, p in gathered],
    }
    if not fsdp:
        out |= {
            "distributed/adapters_identical": len({d for d, _, _ in gathered}) == 1,
            "distributed/adapter_sha256": [d[:16] for d, _, _ in gathered],
        }
    return out


def full_adapter_state(model) -> dict:
    """The trained tensors, whole, on the CPU. Under FSDP2 each is a DTensor sharded across the ranks, and
    `full_tensor()` gathers it (a collective: every rank must call this). Only the adapter is gathered: the
    Trainer's own FSDP save gathers the whole 4-bit base first."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


class FuseSwiGLU(TrainerCallback):
    """fuse_swiglu_down once training begins: the Trainer applies Liger's kernels at the start of train(),
    over any MLP forward set before."""

    def __init__(self, model, liger: bool):
        self.model, self.liger, self.mlps = model, liger, swiglu_mlps(model)

    def on_train_begin(self, args, state, control, **kwargs):
        fuse_swiglu_down(self.model, self.liger)


class LossGuard(TrainerCallback):
    """Stops a run whose logged loss is 0 or not finite: a broken computation, not learning. FSDP with a 4-bit
    base is known to train on like this without an error (accelerate issues 3983 and 3874)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and (loss == 0 or not math.isfinite(loss)):
            hint = (
                " FSDP with a 4-bit base is known to do this; train the same run with DDP "
                "(accelerate/ddp_2gpu.yaml) to compare."
                if fsdp_enabled()
                else ""
            )
            raise ConfigError(
                f"the training loss is {loss} at step {state.global_step}: the computation is broken, "
                f"so the run stops here.{hint}"
            )


class LabTrainer(Trainer):
    """The HF Trainer, less two per-step costs in Python. A QLoRA step on a GPU is bound by the CPU issuing
    its kernels (experiments/fast_path: the issue time equals the step time), so every millisecond of Python
    counts:
    - `floating_point_ops` walks every module and parameter on every step (~40 ms for 32 PEFT-wrapped layers,
      cProfile); QLoRA Lab counts model FLOPs once, from the architecture (qlora_lab/perf.py).
    - gradient clipping over `model.parameters()` walks every frozen base weight too; only the adapters have
      gradients, so clip over those (the same norm, the same clipping). FSDP keeps its own sharded
      clipping."""

    # Keyword arguments for the loss, which reach it through the model's forward as num_items_in_batch does:
    # Liger's fused loss takes its chunk size so (train.loss_chunk_mem)
    head_loss_kwargs: dict = {}

    def floating_point_ops(self, inputs) -> int:
        return 0

    # A static batch (train.cuda_graphs) says how many of its tokens are padding: not for the model (the step
    # gets the batch without it), and not a token seen (counted after the step).
    def _prepare_inputs(self, inputs):
        inputs = {k: v for k, v in inputs.items() if k != PackedCollator.PADDING_KEY}
        if "inputs_embeds" in inputs:  # looked up on the host (train.embedding_on_host): the model takes one
            del inputs["input_ids"]
        return {**super()._prepare_inputs(inputs), **self.head_loss_kwargs}

    def _track_num_input_tokens(self, inputs):
        padding = inputs.pop(PackedCollator.PADDING_KEY, 0)
        if self.args.include_num_input_tokens_seen == "all" and self.accelerator.num_processes == 1:
            # every token counts and the count is the batch's shape: the Trainer's own count goes through a
            # device tensor and .item(), a synchronize on every step
            main = getattr(self.model, "main_input_name", "input_ids")
            self.state.num_input_tokens_seen += inputs[main].numel() - padding
            return
        super()._track_num_input_tokens(inputs)
        if self.args.include_num_input_tokens_seen != "no":
            self.state.num_input_tokens_seen -= padding

    def _clip_grad_norm(self, model):
        if self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)
        if not hasattr(self, "_trainable_params"):
            self._trainable_params = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable_params, self.args.max_grad_norm)


def static_batch(train_ds, batch_size, cfg: Config) -> tuple[int, int, int] | None:
    """train.cuda_graphs: the one shape of every train batch, (tokens, examples, longest example), from the
    packed rows: `batch_size` rows of max_seq_length tokens, and room for the most examples any rows can bring
    plus one padding example per row."""
    if not cfg.train.cuda_graphs:
        return None
    most = max(len(lengths) for lengths in train_ds["lengths"])
    length = cfg.dataset.max_seq_length
    return batch_size * length, batch_size * (most + 1), length


def optimizer(name: str) -> str:
    """`auto`: fused AdamW on CUDA (one kernel for all adapter tensors, not several per tensor), else
    adamw_torch."""
    if name != "auto":
        return name
    return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"


def precision_flags(precision: Precision, autocast: bool) -> dict:
    """The Trainer's mixed-precision flags. Without autocast the step runs in the weights' own dtypes (bf16
    base, fp32 adapters, as PEFT keeps them), as the reference loop does; on 8B shapes it measured neither
    faster nor slower (experiments/fast_path)."""
    if not autocast:
        return {"bf16": False, "fp16": False}
    if precision is Precision.auto:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = Precision.bf16 if bf16 else Precision.fp32
    return {"bf16": precision is Precision.bf16, "fp16": precision is Precision.fp16}


def uncheckpointed(n: int) -> str:
    """The recipe line's note on train.uncheckpointed_layers."""
    if n == 0:
        return ""
    return " (not the last layer)" if n == 1 else f" (not the last {n} layers)"


def run(cfg: Config, run: Run):
    """Train and save the adapter; returns the trained PEFT model (for in-process callers and tests)."""
    t = cfg.train
    layout = RunLayout(run.dir)
    set_seed(t.seed)

    # ---- data
    splits = load_splits(cfg)  # first: a bad data file stops the run before the tokenizer (or a model) loads
    tokenizer = load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code)
    train_ds, train_stats = tokenize_split(splits.train, tokenizer, cfg.dataset, "train")
    eval_ds, eval_stats = tokenize_split(splits.eval, tokenizer, cfg.dataset, "eval")
    run.note(
        dataset={
            "files": [str(f) for f in splits.files],
            "sha256": file_sha256(splits.files),
            "train_examples": len(train_ds),
            "eval_examples": len(eval_ds),
        }
    )
    run.log(train_stats | eval_stats)

    # ---- model
    # outside the timer: a random-weight model is built on first use (or drawn while loading:
    # random_in_memory)
    path = None if cfg.model.random_in_memory else model_path(cfg)
    capped = cap_gpu_memory(t.gpu_memory_cap_gib)
    if capped:
        print(capped, flush=True)
        run.log({"train/gpu_memory_cap_gib": t.gpu_memory_cap_gib})
    t0 = time.perf_counter()
    if sharded_loading(cfg):  # FSDP + 4-bit: each rank builds only its shard, LoRA included
        model, footprint, (trainable, total) = load_sharded(path, cfg)
        load_s = time.perf_counter() - t0
    else:
        model = load_model(path, cfg)
        load_s = time.perf_counter() - t0
        footprint = memory_footprint_gib(model)
        model = attach_lora(model, cfg)
        trainable, total = count_params(model)
    pissa_init = layout.pissa_init if cfg.lora.init is LoraInit.pissa else None
    if pissa_init and not (pissa_init / "adapter_config.json").is_file() and is_main_process():
        # the adapter as initialised: at the end, PEFT turns the trained PiSSA adapter into a plain LoRA (rank
        # 2r) over the original weights, which every later stage loads; a resumed run re-derives the same init
        model.save_pretrained(pissa_init)
    quantized = cfg.quantization.method is not QuantMethod.none
    mode = f"QLoRA ({cfg.quantization.method.value})" if quantized else "LoRA"
    print(
        f"{mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
        f"base footprint {footprint:.3f} GiB, loaded in {load_s:.1f} s",
        flush=True,
    )
    run.log(
        {
            "model/load_s": load_s,
            "model/footprint_gib": footprint,
            "params/trainable": trainable,
            "params/total": total,
        }
    )
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if load_peak is not None:  # what loading alone took on this rank
        run.log({"memory/load_peak_gib": load_peak})
    # No KV cache in training: with one, transformers ignores packed position ids and lets examples attend
    # across their boundaries (recent Trainers set this too)
    model.config.use_cache = False
    liger = liger_kernels(cfg, model.config.model_type)
    # Under FSDP the loss reads the LM head's shards, never the whole head (Liger's fused loss would need it
    # gathered on every rank: 1.96 GiB on 70B)
    head_loss = fsdp_enabled() and use_sharded_head_loss(model)
    kernels = (
        f"Liger (RMSNorm, RoPE, SwiGLU{'' if head_loss else ', fused linear cross-entropy'})"
        if liger
        else "transformers"
    ) + (" with the loss over the LM head's shards" if head_loss else "")
    unfused = lora_unfused_reason(cfg)
    # in a checkpointed layer a fused 4-bit layer keeps its dequantized weight from recompute to backward
    # (not under torch's offload; the graphs' own offload moves only the layers' inputs)
    keep_weight = t.gradient_checkpointing and (t.cuda_graphs or not t.activation_offload)
    fused = fuse_lora(model, keep_weight) if unfused is None else 0
    grouped = group_projections(model, keep_weight) if projections_ungrouped_reason(cfg) is None else 0
    keep_no_weight_unless_checkpointed(checkpointing_layers(model))
    varlen = packed_varlen(cfg, model.dtype)
    if varlen:
        use_varlen(model)
    graphs = install_layer_graphs(model, fused, t.activation_offload) if t.cuda_graphs else None
    if t.gradient_checkpointing:  # the layers it leaves out keep their norms' inputs, not their outputs
        recompute_norms(checkpointing_layers(model))
    # the MLPs' SwiGLU node goes in when training begins (FuseSwiGLU); the embedding moves to the host then
    swiglu = FuseSwiGLU(model, liger) if unfused is None else None
    host_embedding = HostEmbedding(model) if t.embedding_on_host else None
    lora_layers = (
        f"fused ({fused}, {grouped} groups, {len(swiglu.mlps) if swiglu else 0} with their SwiGLU)"
        if unfused is None
        else f"peft ({unfused})"
    )
    attention = (
        "varlen (PyTorch FlashAttention) for packed rows"
        if varlen
        else model.config._attn_implementation
        + (" with a block-diagonal mask for packed rows" if cfg.dataset.pack else "")
    )
    print(
        f"recipe {cfg.recipe}: attention {attention}, k-bit preparation "
        f"{cfg.quantization.preparation.value if quantized else 'n/a (not quantized)'}, optimizer "
        f"{optimizer(t.optim)}, kernels "
        f"{kernels}, LoRA layers {lora_layers}"
        ", autocast "
        f"{'on' if t.autocast else 'off'}, gradient checkpointing "
        f"{'on' if t.gradient_checkpointing else 'off'}"
        f"{uncheckpointed(t.uncheckpointed_layers)}"
        f"{', CUDA graphs per decoder layer' if graphs else ''}"
        f"{', input embedding in host memory' if host_embedding else ''}",
        flush=True,
    )

    # ---- trainer
    checkpoint = last_checkpoint(layout.checkpoints) if t.resume else None
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(layout.tensorboard)
    auto_batch = t.batch_size == "auto"
    flags = precision_flags(t.precision, t.autocast)
    args = TrainingArguments(
        output_dir=str(layout.checkpoints),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        # batch_size=auto: accelerate's find_executable_batch_size, 0.9x from train.auto_batch_start on each
        # OOM
        per_device_train_batch_size=t.auto_batch_start if auto_batch else t.batch_size,
        per_device_eval_batch_size=1 if auto_batch else t.batch_size,
        auto_find_batch_size=auto_batch,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer(t.optim),
        seed=t.seed,
        data_seed=t.seed,  # same seed, same data order in every job of a sweep
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        # eval_before runs inside train(), after the model is wrapped: a trainer.evaluate() before train()
        # left DDP ranks unsynchronised (measured: different adapters on 2 gloo ranks).
        eval_on_start=t.eval_before
        and checkpoint is None,  # a resumed run has it in its restored log history
        # tokens/s counts real tokens: every token of a varlen batch; else the attention mask's ones, or for
        # packed rows aligned with pad tokens, the tokens that are not the pad token (where the pad token is
        # EOS, EOS tokens too: ~1.5% of Alpaca rows rendered with SmolLM2's chat template)
        report_to=list(t.report_to),
        include_num_input_tokens_seen="all" if varlen else "non_padding",
        use_liger_kernel=liger,
        liger_kernel_config={"fused_linear_cross_entropy": False} if head_loss else None,
        # the filter costs a synchronize on every step (its torch.isnan(loss) check) for what LossGuard does
        # at every log: a loss that is not finite stops the run
        logging_nan_inf_filter=False,
        # batches go to the GPU from pinned memory without a synchronize, so the host can issue the next step
        # while the GPU finishes this one
        accelerator_config={"non_blocking": True},
        prediction_loss_only=True,  # the evaluation needs the loss alone, not every token's logits gathered
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # DDP: every adapter weight gets a gradient in every step, and the only buffers (rotary tables) never
        # change. The Trainer's default for a PEFT model searches the graph for unused weights after every
        # backward (find_unused_parameters) and broadcasts buffers before every forward: CPU time a step
        # cannot spare.
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,
        **flags,
    )
    # accelerate launch hands its config's mixed_precision to the Trainer through the environment, which would
    # turn autocast on behind train.autocast (and send the fused LoRA layers down PEFT's path): the run's
    # config decides.
    args.mixed_precision = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no"
    single = one_gpu_per_process(args)
    if single:
        print(single, flush=True)
    timer = StepTimer()
    curve = EvalCurve(timer)
    collator = (
        PackedCollator(tokenizer.pad_token_id, varlen, static_batch(train_ds, t.batch_size, cfg))
        if cfg.dataset.pack
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    cap = MemoryCap(t.memory_cap_gib, model) if auto_batch and t.memory_cap_gib is not None else None
    trainer = LabTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=host_embedding.collate(collator) if host_embedding else collator,
        callbacks=[timer, curve, Progress(run), LossGuard()]
        + [c for c in (swiglu, host_embedding) if c]
        + ([cap] if cap else [])
        + ([StepProfiler(run.dir, t.speed_skip_steps)] if t.profile else []),
    )
    if liger and not head_loss:
        trainer.head_loss_kwargs = {"chunk_mem_const": t.loss_chunk_mem}

    if sharded_loading(cfg):
        # Sharded already, which accelerate's prepare leaves as it is; but first it looks the decoder layer's
        # class up by name to choose what to wrap, and fully_shard has renamed it (FSDPLlamaDecoderLayer):
        # nothing to wrap.
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = None

    # ---- loop
    if checkpoint:
        print(f"resuming from {checkpoint}", flush=True)
    if torch.cuda.is_available():  # what the rank holds before the first step: weights, shards, constants
        run.log({"memory/before_train_gib": torch.cuda.memory_allocated() / 2**30})
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if t.eval_before:
        # The step-0 evaluation: the base model where B starts at zero (lora.init=loftq starts closer to W).
        loss_before = next(h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h)
        run.log({"eval/loss_before": loss_before, "eval/perplexity_before": math.exp(loss_before)})
    eval_loss = trainer.evaluate()["eval_loss"]
    batch, world = (
        trainer.state.train_batch_size,
        trainer.accelerator.num_processes,
    )  # batch: as found, with auto
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    run.log(
        {
            "train/loss": result.training_loss,
            "train/loss_first": losses[0] if losses else None,
            "train/loss_last": losses[-1] if losses else None,
            "train/steps": trainer.state.global_step,
            "train/runtime_s": result.metrics.get("train_runtime"),
            "train/tokens_seen": trainer.state.num_input_tokens_seen,
            "eval/loss": eval_loss,
            "eval/perplexity": math.exp(eval_loss),
            "train/batch_size": batch,
            "train/losses": losses,
            "eval/curve": curve.points,
            # training's own peak: memory/peak_gib is the whole job's, later stages (evaluate, merge) included
            "memory/train_peak_gib": peak_memory_gib(),
        }
        | timer.summary(t.speed_skip_steps, batch * t.grad_accum * world, world)
    )
    run.log(utilisation(run.metrics, model, trainable, mean_context(train_ds), t.peak_tflops))
    if graphs:
        run.log({"train/cuda_graphs": graphs.status()})
        print(f"CUDA graphs: {graphs.status()}", flush=True)
    if cap:  # the batch found under the cap, and the larger ones that went over it
        run.log({"train/memory_cap_gib": t.memory_cap_gib, "train/batch_over_cap": cap.over})
    if trainer.accelerator.num_processes > 1:
        run.log(check_ranks_agree(model, trainer.accelerator.num_processes, load_peak))

    # ---- save: standard PEFT folder (adapter_config.json + adapter_model.safetensors) with the tokenizer
    if trainer.is_fsdp_enabled:
        # every rank holds a shard of each adapter tensor: gather them whole (collectives, so on every rank)
        adapter = full_adapter_state(model)
        if trainer.is_world_process_zero():
            model.save_pretrained(layout.adapter, state_dict=adapter)
            tokenizer.save_pretrained(layout.adapter)
    elif trainer.is_world_process_zero():
        model.save_pretrained(
            layout.adapter, path_initial_model_for_weight_conversion=pissa_init and str(pissa_init)
        )
        tokenizer.save_pretrained(layout.adapter)
    before = run.metrics.get("eval/loss_before")
    print(
        f"eval loss: {before:.4f} -> {eval_loss:.4f}"
        if before is not None
        else f"eval loss: {eval_loss:.4f}",
        f"| adapter saved to {layout.adapter}",
        flush=True,
    )
    return model
