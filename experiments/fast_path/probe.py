"""Where does a QLoRA Lab step lose time against the plain reference loop? One model load, several variants of
the same step, each timed like reference_loop.py (median of the steps after 2 warm-ups, device-synchronised).

    python experiments/fast_path/probe.py +experiment=lora_vs_qlora_gpu_8b quantization=nf4 dataset.size=400

PROBE_VARIANTS=packed_sdpa (comma-separated) runs only those; PROBE_STEPS sets the steps per variant (10).
Variants: `random_sdpa` (the reference: random ids, 2 x 2048, sdpa), `random_flex` (the same ids, flex
attention), `packed_flex` / `packed_sdpa` (our packed Alpaca rows, boundaries kept), `packed_fixed_flex` (rows
padded to exactly 2 x 2048 with a filler example: one shape for every step), `packed_fixed_sdpa` (the same
with every SDPA backend), `packed_sdpa_{train,clip,zero,trainerlike}` (the packed sdpa step plus what the
Trainer does around it, one piece at a time, then all together), `random_compiled` / `packed_fixed_compiled`
(decoder layers under torch.compile).
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qlora_lab.config import project_root, register  # noqa: E402
from qlora_lab.data import IGNORE_INDEX, PackedCollator, load_splits, tokenize_split  # noqa: E402
from qlora_lab.models import attach_lora, load_model, load_tokenizer, model_path, tokenizer_path  # noqa: E402

register()
with initialize_config_dir(config_dir=str(Path(project_root()) / "conf"), version_base="1.3"):
    cfg = compose(config_name="config", overrides=sys.argv[1:])
steps = int(os.environ.get("PROBE_STEPS", 10))
wanted = set(filter(None, os.environ.get("PROBE_VARIANTS", "").split(",")))


def timed(name, make_batch, model, opt, n_tokens, extras=()):
    """extras: what the Trainer adds around the same step ("train": model.train(), "clip": clip_grad_norm_
    over model.parameters() read back as a float, "zero": model.zero_grad() instead of the optimizer's)."""
    if wanted and name not in wanted:
        return
    times, launch = [], []
    for i in range(steps):
        batch = make_batch(i)
        torch.cuda.synchronize()
        t = time.perf_counter()
        if "train" in extras:
            model.train()
        loss = model(**batch).loss
        loss.backward()
        if "clip" in extras:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3).item()
        opt.step()
        model.zero_grad() if "zero" in extras else opt.zero_grad(set_to_none=True)
        launch.append(time.perf_counter() - t)  # CPU time to issue the step: close to step_s when CPU-bound
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = statistics.median(times[2:])
    toks = n_tokens(0)
    print(
        json.dumps(
            {
                "variant": name,
                "step_s": round(med, 4),
                "min": round(min(times[2:]), 4),
                "max": round(max(times[2:]), 4),
                "launch_s": round(statistics.median(launch[2:]), 4),
                "tokens_per_step": toks,
                "tokens_per_s": round(toks / med),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
        ),
        flush=True,
    )


tokenizer = load_tokenizer(tokenizer_path(cfg))
rows, _ = tokenize_split(load_splits(cfg).train, tokenizer, cfg.dataset, "train")
collate = PackedCollator(tokenizer.pad_token_id)
batches = [collate([rows[2 * i], rows[2 * i + 1]]) for i in range(len(rows) // 2)]
fill = sum(b["input_ids"].shape[1] for b in batches) / (len(batches) * 4096)
print(f"packed rows: {len(rows)}, batches {len(batches)}, mean fill {fill:.3f}", flush=True)


def fixed(b):  # pad to exactly 4096 tokens with a filler example (own positions, no labels)
    n = 4096 - b["input_ids"].shape[1]
    if n <= 0:
        return b
    pad = torch.full((1, n), tokenizer.pad_token_id)
    return {
        "input_ids": torch.cat([b["input_ids"], pad], 1),
        "labels": torch.cat([b["labels"], torch.full((1, n), IGNORE_INDEX)], 1),
        "position_ids": torch.cat([b["position_ids"], torch.arange(n)[None]], 1),
    }


def on_gpu(b):
    return {k: v.cuda() for k, v in b.items()}


ids = torch.randint(0, 32000, (2, 2048), device="cuda")
for attn in ["sdpa", "flex_attention"]:
    short = "sdpa" if attn == "sdpa" else "flex"
    if wanted and not any(short in v for v in wanted):
        continue
    cfg.model.attn_implementation = attn
    torch.cuda.reset_peak_memory_stats()
    model = attach_lora(load_model(model_path(cfg), cfg), cfg)
    model.config.use_cache = False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model.get_base_model())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    timed(f"random_{short}", lambda i: {"input_ids": ids, "labels": ids}, model, opt, lambda i: 4096)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    ):  # no cuDNN
        timed(
            f"packed_{short}",
            lambda i: on_gpu(batches[i % len(batches)]),
            model,
            opt,
            lambda i: round(fill * 4096),
        )
        for extra in ["train", "clip", "zero"]:
            timed(
                f"packed_{short}_{extra}",
                lambda i: on_gpu(batches[i % len(batches)]),
                model,
                opt,
                lambda i: round(fill * 4096),
                (extra,),
            )
        timed(
            f"packed_{short}_trainerlike",
            lambda i: on_gpu(batches[i % len(batches)]),
            model,
            opt,
            lambda i: round(fill * 4096),
            ("train", "clip", "zero"),
        )
    if (
        short == "sdpa"
    ):  # every SDPA backend, cuDNN included (the train stage leaves cuDNN out for packed rows)
        timed(
            "packed_sdpa_cudnn",
            lambda i: on_gpu(batches[i % len(batches)]),
            model,
            opt,
            lambda i: round(fill * 4096),
        )
    if short == "sdpa":  # one shape for every step (a filler example tops each batch up to 2 x 2048)
        timed(
            "packed_fixed_sdpa",
            lambda i: on_gpu(fixed(batches[i % len(batches)])),
            model,
            opt,
            lambda i: round(fill * 4096),
        )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        timed(
            f"packed_{short}_autocast",
            lambda i: on_gpu(batches[i % len(batches)]),
            model,
            opt,
            lambda i: round(fill * 4096),
        )
    if short == "flex":
        timed(
            "packed_fixed_flex",
            lambda i: on_gpu(fixed(batches[i % len(batches)])),
            model,
            opt,
            lambda i: round(fill * 4096),
        )
    del model, opt
    torch.cuda.empty_cache()

if any("compiled" in v for v in wanted):
    # torch.compile of each decoder layer. Liger's in-layer kernels (RMSNorm, RoPE, SwiGLU) are left out:
    # Inductor fuses those itself, and Liger's autograd Functions fail under dynamo; its fused linear
    # cross-entropy stays.
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    cfg.model.attn_implementation = "sdpa"
    torch.cuda.reset_peak_memory_stats()
    model = attach_lora(load_model(model_path(cfg), cfg), cfg)
    model.config.use_cache = False
    _apply_liger_kernel_to_instance(model=model.get_base_model(), rope=False, rms_norm=False, swiglu=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    try:
        for layer in model.get_base_model().model.layers:
            layer.compile()
        timed("random_compiled", lambda i: {"input_ids": ids, "labels": ids}, model, opt, lambda i: 4096)
        timed(
            "packed_fixed_compiled",
            lambda i: on_gpu(fixed(batches[i % len(batches)])),
            model,
            opt,
            lambda i: round(fill * 4096),
        )
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        print(json.dumps({"variant": "compiled", "error": f"{type(e).__name__}: {e}"[:3000]}), flush=True)
