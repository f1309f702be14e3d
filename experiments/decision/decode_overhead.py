"""What a decode step of the evaluate stage's generation costs apart from the model's arithmetic, on a CPU.

A twin of SmolLM2-135M-Instruct as +experiment=decision_gsm8k evaluates it: 30 layers, 9 query / 3 key-value
heads, the 49,152-word vocabulary, its LoRA adapter unmerged (PEFT, the `adapter` inference mode), the same
GSM8K prompts cut to their last 16 tokens, but hidden sizes of 72/128 so that the arithmetic is small and what
is left is the per-step dispatch that a GPU cannot hide for a 135M model. Prints the aten ops dispatched per
decode step and the milliseconds per step at several batch sizes, with generation under no_grad and under
inference_mode. From the checkout root (one thread: the 2 shared cores make multi-thread timings noise):

    OMP_NUM_THREADS=1 .venv/bin/python experiments/decision/decode_overhead.py [--real] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path
from unittest import mock

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

from qlora_lab.config import register
from qlora_lab.inference import eval_prompts, generate
from qlora_lab.models import load_tokenizer, lora_config, model_path

ROOT = Path(__file__).resolve().parents[2]


def twin(cfg, dtype, real: bool):
    """The twin, or with `real` SmolLM2 itself; either with a fresh (unmerged) LoRA adapter."""
    torch.manual_seed(0)
    if real:
        model = AutoModelForCausalLM.from_pretrained(model_path(cfg), dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(model_path(cfg))
        config.hidden_size, config.intermediate_size, config.head_dim = 72, 128, 8
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return get_peft_model(model.eval(), lora_config(cfg)).eval()


def ops_per_step(model, tokenizer, prompts, gen) -> collections.Counter:
    """Top-level aten calls (each a kernel launch or more on a GPU) per decode step: the difference between 9
    and 1 new tokens, over 8."""
    counts = []
    for n in (1, 9):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            generate(model, tokenizer, prompts, OmegaConf.merge(gen, {"max_new_tokens": n}), len(prompts))
        c = collections.Counter(
            e.name
            for e in p.events()
            if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
        )
        counts.append(c)
    return collections.Counter({k: (counts[1][k] - counts[0][k]) / 8 for k in counts[1]})


def ms_per_step(model, tokenizer, prompts, gen, steps: int = 33, repeats: int = 3) -> float:
    best = {}
    for n in (1, steps):
        config = OmegaConf.merge(gen, {"max_new_tokens": n})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(model, tokenizer, prompts, config, len(prompts))
            times.append(time.perf_counter() - t0)
        best[n] = min(times)
    return (best[steps] - best[1]) / (steps - 1) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64, 440])
    # bfloat16: the casts a GPU run makes (counts only: bf16 arithmetic is slow on our CPUs)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M itself instead of the twin")
    args = parser.parse_args()
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=decision_gsm8k"])
    tokenizer = load_tokenizer(model_path(cfg))
    tokenizer.padding_side = "left"
    model = twin(cfg, getattr(torch, args.dtype), args.real)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    prompts = [e["prompt"] for e in eval_prompts(cfg, tokenizer, max(args.batches))]
    prompts = [tokenizer.decode(tokenizer(p)["input_ids"][-16:]) for p in prompts]
    gen = cfg.generation
    generate(model, tokenizer, prompts[:2], OmegaConf.merge(gen, {"max_new_tokens": 2}), 2)  # warm-up

    ops = ops_per_step(model, tokenizer, prompts[:8], gen)
    top = ", ".join(f"{k[6:]} {v:.0f}" for k, v in ops.most_common(8))
    what = "SmolLM2-135M" if args.real else "twin"
    calls = sum(ops.values())
    print(f"{args.dtype} {what}, adapter unmerged: {calls:.0f} aten calls per decode step ({top})")
    with model.disable_adapter():
        base = sum(ops_per_step(model, tokenizer, prompts[:8], gen).values())
    print(f"the same model without its adapter: {base:.0f} aten calls per decode step")
    print(f"torch threads: {torch.get_num_threads()}")
    for batch in args.batches:
        after = ms_per_step(model, tokenizer, prompts[:batch], gen)
        with mock.patch.object(torch, "inference_mode", torch.no_grad):  # generation as it was
            before = ms_per_step(model, tokenizer, prompts[:batch], gen)
        print(f"batch {batch}: {before:.1f} ms per decode step (no_grad), {after:.1f} (inference_mode)")


if __name__ == "__main__":
    main()
