"""Loading a trained run for generation in each inference mode, batched generation, and eval prompts.

The three ways of running a QLoRA fine-tune (plus the base alone as the "before"), each a file of
qlora_lab/inference_modes:
  merged            <run>/merged/ from disk (written by the merge stage), quantized per cfg.quantization
  adapter           the base quantized as in training + the unmerged PEFT adapter (what was trained)
  merge_and_unload  the same base + adapter, merged in memory by PEFT (on a 4-bit base PEFT dequantizes,
                    adds the LoRA delta and quantizes again)
  base              the base model alone
  int8_dynamic      <run>/export/int8_dynamic (written by the export stage): dynamic int8 linear layers,
                    CPU only
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationConfig as HFGenerationConfig
from transformers.generation.streamers import BaseStreamer

from .config import Config, ConfigError, GenerationConfig, InferenceMode
from .data import IGNORE_INDEX, encode, end_of_turn_id, load_splits, prompt_and_reference, render_prompt
from .layout import RunLayout
from .models import check_safetensors

# ---------------------------------------------------------------- loading


def adapter_dir(source: Path) -> Path:
    path = RunLayout(source).adapter
    if not RunLayout(source).adapter_config.is_file():
        raise ConfigError(
            f"{source} has no trained adapter (adapter/adapter_config.json); pass run_dir= a finished "
            f"training run, or put the train stage first in pipeline.stages."
        )
    check_safetensors(path, f"run_dir={source}", "train the run again, or restore the file from a copy.")
    return path


def merged_dir(source: Path) -> Path:
    path = RunLayout(source).merged
    if not RunLayout(source).merged_config.is_file():
        raise ConfigError(
            f"{source} has no merged model (merged/config.json); run `python -m qlora_lab "
            f"pipeline=merge run_dir={source}` first, or put the merge stage before this one."
        )
    check_safetensors(
        path,
        f"run_dir={source}",
        f"merge again with `python -m qlora_lab pipeline=merge run_dir={source} merge.overwrite=true`.",
    )
    return path


def int8_export_dir(source: Path) -> Path:
    from .int8_dynamic import is_export

    path = RunLayout(source).int8_export
    if not is_export(path):
        raise ConfigError(
            f"{source} has no int8 export (export/int8_dynamic); run `python -m qlora_lab "
            f"pipeline=export run_dir={source} export=int8_dynamic` first."
        )
    return path


def resize_embeddings(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the model (e.g. an added pad token)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def load_for_inference(cfg: Config, source: Path, mode: InferenceMode | str):
    """(model in eval mode, tokenizer with left padding) for one inference mode of the run in `source`."""
    from .inference_modes import MODES

    # a member, or its name from a caller outside the config
    model, tokenizer = MODES[InferenceMode(mode)].load(cfg, Path(source))
    tokenizer.padding_side = "left"  # batched generation: every prompt ends right where generation starts
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def context_length(model) -> int:
    """The model's context in tokens (2048 where its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None) or 2048


def conversation_ids(messages: list[dict], tokenizer, d, max_new_tokens: int, max_len: int):
    """(input ids, the messages they hold): rendered by data.render_prompt, as training renders, with the
    oldest exchanges dropped until the prompt and the answer fit the context. The one rule for pipeline=chat
    and the web app; a single message that alone does not fit is returned as is (the caller says so)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    history = messages[len(system) :]
    while True:
        ids = encode(render_prompt(system + history, tokenizer, d), tokenizer, return_tensors="pt")[
            "input_ids"
        ]
        if ids.shape[1] + max_new_tokens <= max_len or len(history) <= 1:
            return ids, system + history
        history = history[2:]


# ---------------------------------------------------------------- generation


class _FirstTokenClock(BaseStreamer):
    """Records when generate() emits its first new token. generate() calls put() once with the prompt, then
    once per decoding step; we only need the time of the second call."""

    def __init__(self):
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def hf_generation_config(gen: GenerationConfig, tokenizer) -> HFGenerationConfig:
    """Our generation group as a transformers GenerationConfig (sampling knobs only when sampling)."""
    # stop at EOS and at the token the chat template ends a turn with, where that is another (as trained:
    # data.py)
    stop = list(dict.fromkeys([tokenizer.eos_token_id, end_of_turn_id(tokenizer) or tokenizer.eos_token_id]))
    kwargs = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": gen.do_sample,
        "repetition_penalty": gen.repetition_penalty,
        "no_repeat_ngram_size": gen.no_repeat_ngram_size,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stop[0] if len(stop) == 1 else stop,
    }
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)  # unset: greedy ignores them (and would warn)
    return HFGenerationConfig(**kwargs)


def count_new_tokens(ids: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first end-of-sequence token (what follows is padding)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return i + 1
    return len(ids)


def generate(model, tokenizer, prompts: list[str], gen: GenerationConfig, batch_size: int) -> list[dict]:
    """Generate for prompts rendered by data.render_prompt, `batch_size` at a time with left padding.

    Returns one dict per prompt: prompt, output (new text, special tokens skipped), new_tokens, latency_s (the
    whole batch's wall time) and ttft_s (the batch's time to first token).
    """
    config = hf_generation_config(gen, tokenizer)
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        enc = encode(batch, tokenizer, return_tensors="pt", padding=True).to(device)
        clock = _FirstTokenClock()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # inference_mode: no autograd bookkeeping on any of the ~3,000 ops of each decode step (no_grad keeps
        # some); the answers are the same
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=config, streamer=clock)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        latency = time.perf_counter() - t0
        ttft = (clock.first_token_at - t0) if clock.first_token_at else latency
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        for prompt, ids in zip(batch, new, strict=True):
            n = count_new_tokens(ids, eos_ids)
            results.append(
                {
                    "prompt": prompt,
                    "output": tokenizer.decode(ids[:n], skip_special_tokens=True),
                    "new_tokens": n,
                    "latency_s": latency,
                    "ttft_s": ttft,
                }
            )
    return results


# ---------------------------------------------------------------- prompts


def eval_prompts(cfg: Config, tokenizer, n: int) -> list[dict]:
    """The first n rows of the eval split as generation tasks: prompt (the conversation up to its last
    assistant turn, rendered as in training), reference (that turn), message (the last user turn), row."""
    return [prompt_and_reference(row, tokenizer, cfg.dataset) for row in load_splits(cfg).eval[:n]]


# --------------------------------------------------------- teacher-forced pass over the eval split, agreement


def eval_batches(examples: list[dict], batch_size: int, pad_id: int):
    """Right-padded batches of tokenized examples (prompt labels already -100)."""
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in batch)
        pad = [width - len(e["input_ids"]) for e in batch]
        yield (
            torch.tensor([e["input_ids"] + [pad_id] * p for e, p in zip(batch, pad, strict=True)]),
            torch.tensor([[1] * len(e["input_ids"]) + [0] * p for e, p in zip(batch, pad, strict=True)]),
            torch.tensor([e["labels"] + [IGNORE_INDEX] * p for e, p in zip(batch, pad, strict=True)]),
        )


@torch.no_grad()
def teacher_forced(model, examples: list[dict], batch_size: int, pad_id: int, keep: int):
    """(eval perplexity over the response tokens, fp32 logits of the first `keep` examples without
    padding)."""
    device = next(model.parameters()).device
    nll, tokens, kept = 0.0, 0, []
    for ids, mask, labels in eval_batches(examples, batch_size, pad_id):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        shift_labels = labels[:, 1:].to(device)
        # fp32 one example at a time: a whole batch's fp32 logits over the vocabulary can take tens of GiB
        # (128 GSM8K rows x 1,024 tokens x 49,152 words = 24 GiB)
        for row, row_labels, m in zip(logits, shift_labels, mask, strict=True):
            row = row.float()
            nll += F.cross_entropy(row[:-1], row_labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            if len(kept) < keep:
                kept.append(row[: int(m.sum())].cpu())
        tokens += int((shift_labels != IGNORE_INDEX).sum())
    return math.exp(nll / tokens), kept


def measure_generation(
    model, tokenizer, prompts: list[str], gen, batch_size: int, examples: list[dict], pad_id: int, keep: int
) -> tuple[dict, list[str], list[torch.Tensor]]:
    """The measurement every comparison of models makes (compare's modes, export's files): a warm-up, greedy
    or sampled answers to `prompts`, teacher-forced perplexity over `examples`. Returns (ttft_s, tokens_per_s,
    eval_perplexity and new_tokens; the outputs; the fp32 logits of the first `keep` examples)."""
    from omegaconf import OmegaConf

    generate(model, tokenizer, prompts[:1], OmegaConf.merge(gen, {"max_new_tokens": 2}), 1)  # warm-up
    results = generate(model, tokenizer, prompts, gen, batch_size)
    ppl, logits = teacher_forced(model, examples, batch_size, pad_id, keep)
    batches = {r["latency_s"]: r["ttft_s"] for r in results}  # one latency and ttft per batch
    new_tokens = sum(r["new_tokens"] for r in results)
    stats = {
        "ttft_s": sum(batches.values()) / len(batches),
        "tokens_per_s": new_tokens / sum(batches),
        "eval_perplexity": ppl,
        "new_tokens": new_tokens,
    }
    return stats, [r["output"] for r in results], logits


def agreement(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> tuple[float, float]:
    """Max |logit difference| and mean KL(reference || other) per position, over all kept positions."""
    ref, cur = torch.cat(reference), torch.cat(logits)
    ref_logp, cur_logp = F.log_softmax(ref, -1), F.log_softmax(cur, -1)
    kl = (ref_logp.exp() * (ref_logp - cur_logp)).sum(-1).mean().item()
    return (ref - cur).abs().max().item(), kl
