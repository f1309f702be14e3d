"""Train: data -> base model (quantized or not) -> LoRA -> Trainer -> adapter/ + metrics.

Reads top to bottom like a recipe: setup, data, model, loop, save.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import statistics
import time

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..config import Config, QuantMethod
from ..data import file_sha256, load_splits, tokenize_split
from ..models import (
    attach_lora,
    count_params,
    load_model,
    load_tokenizer,
    memory_footprint_gib,
    model_path,
    tokenizer_path,
)
from ..resume import Progress, last_checkpoint
from ..rundir import Run, peak_memory_gib

log = logging.getLogger(__name__)


class StepTimer(TrainerCallback):
    """Device-synchronized wall time and real (non-padding) tokens of every optimizer step.

    Written by hand because the Trainer's own train_runtime includes evaluation, logging and warm-up.
    """

    def __init__(self):
        self.step_s: list[float] = []
        self.step_tokens: list[int] = []
        self._t0 = 0.0
        self._seen = 0

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.step_s.append(time.perf_counter() - self._t0)
        self.step_tokens.append(state.num_input_tokens_seen - self._seen)
        self._seen = state.num_input_tokens_seen

    def summary(self, skip: int, samples_per_step: int) -> dict:
        """Speed over the steps after the first `skip` (all steps if there are not more than that)."""
        s, t = (self.step_s[skip:], self.step_tokens[skip:]) if len(self.step_s) > skip else (self.step_s, self.step_tokens)
        if not s:
            return {}
        return {"train/tokens_per_s": sum(t) / sum(s), "train/samples_per_s": samples_per_step * len(s) / sum(s),
                "train/step_time_median_s": statistics.median(s), "train/timed_steps": len(s)}


def check_ranks_agree(model, world_size: int) -> dict:
    """Distributed runs: gather every rank's adapter digest and peak memory. DDP must leave identical adapters."""
    from accelerate.utils import gather_object

    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            h.update(name.encode() + param.detach().float().cpu().numpy().tobytes())
    gathered = gather_object([(h.hexdigest(), peak_memory_gib()["memory/peak_gib"])])
    return {"distributed/world_size": world_size, "distributed/adapters_identical": len({d for d, _ in gathered}) == 1,
            "distributed/adapter_sha256": [d[:16] for d, _ in gathered], "memory/peak_gib_per_rank": [p for _, p in gathered]}


def precision_flags(precision: str) -> dict:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def run(cfg: Config, run: Run):
    """Train and save the adapter; returns the trained PEFT model (for in-process callers and tests)."""
    t = cfg.train
    set_seed(t.seed)

    # ---- data
    splits = load_splits(cfg)  # first: a bad data file stops the run before the tokenizer (or a model) loads
    tokenizer = load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code)
    train_ds, train_stats = tokenize_split(splits.train, tokenizer, cfg.dataset, "train")
    eval_ds, eval_stats = tokenize_split(splits.eval, tokenizer, cfg.dataset, "eval")
    run.note(dataset={"files": [str(f) for f in splits.files], "sha256": file_sha256(splits.files),
                      "train_examples": len(train_ds), "eval_examples": len(eval_ds)})
    run.log(train_stats | eval_stats)

    # ---- model
    path = model_path(cfg)  # outside the timer: a random-weight model is built on first use
    t0 = time.perf_counter()
    model = load_model(path, cfg)
    load_s = time.perf_counter() - t0
    footprint = memory_footprint_gib(model)
    model = attach_lora(model, cfg)
    trainable, total = count_params(model)
    mode = "LoRA" if QuantMethod(cfg.quantization.method) is QuantMethod.none else f"QLoRA ({cfg.quantization.method.value})"
    print(f"{mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
          f"base footprint {footprint:.3f} GiB, loaded in {load_s:.1f} s", flush=True)
    run.log({"model/load_s": load_s, "model/footprint_gib": footprint, "params/trainable": trainable,
             "params/total": total})

    # ---- trainer
    checkpoint = last_checkpoint(run.dir / "checkpoints") if t.resume else None
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.dir / "tensorboard")
    args = TrainingArguments(
        output_dir=str(run.dir / "checkpoints"),
        max_steps=t.max_steps, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim=t.optim,
        seed=t.seed, data_seed=t.seed,  # same seed, same data order in every job of a sweep
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        # eval_before runs inside train(), after the model is wrapped: a trainer.evaluate() before train() left
        # DDP ranks unsynchronised (measured: different adapters on 2 gloo ranks).
        eval_on_start=t.eval_before and checkpoint is None,  # a resumed run has it in its restored log history
        report_to=list(t.report_to), include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        **precision_flags(t.precision),
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[timer, Progress(run)])

    # ---- loop
    if checkpoint:
        print(f"resuming from {checkpoint}", flush=True)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if t.eval_before:
        # The step-0 evaluation: LoRA's B matrices start at zero, so this is exactly the base model.
        loss_before = next(h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h)
        run.log({"eval/loss_before": loss_before, "eval/perplexity_before": math.exp(loss_before)})
    eval_loss = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    run.log({"train/loss": result.training_loss, "train/loss_first": losses[0] if losses else None,
             "train/loss_last": losses[-1] if losses else None, "train/steps": trainer.state.global_step,
             "train/runtime_s": result.metrics.get("train_runtime"), "train/tokens_seen": trainer.state.num_input_tokens_seen,
             "eval/loss": eval_loss, "eval/perplexity": math.exp(eval_loss)}
            | timer.summary(t.speed_skip_steps, t.batch_size * t.grad_accum * trainer.accelerator.num_processes))
    if trainer.accelerator.num_processes > 1:
        run.log(check_ranks_agree(model, trainer.accelerator.num_processes))

    # ---- save: standard PEFT folder (adapter_config.json + adapter_model.safetensors) with the tokenizer
    if trainer.is_world_process_zero():
        model.save_pretrained(run.dir / "adapter")
        tokenizer.save_pretrained(run.dir / "adapter")
    before = run.metrics.get("eval/loss_before")
    print(f"eval loss: {before:.4f} -> {eval_loss:.4f}" if before is not None else f"eval loss: {eval_loss:.4f}",
          f"| adapter saved to {run.dir / 'adapter'}", flush=True)
    return model
