"""Compare: the inference modes of one trained run, measured against each other on the same prompts and data.

For every mode in inference.modes (the `adapter` mode, the model as trained, is the reference and runs first):
  cost       load time, time to first token, generated tokens/s, peak memory, model footprint
  agreement  greedy exact-match rate with the adapter's outputs, max |logit difference| and mean
             KL(adapter || mode) over every position of the first inference.agreement_examples eval examples
  quality    eval perplexity (response tokens only, as the training loss)
Writes comparison.csv, comparison.md (also printed) and comparison_generations.jsonl in the job dir.
"""

from __future__ import annotations

import csv
import gc
import json
import time

from omegaconf import OmegaConf

from ..config import Config, InferenceMode
from ..data import load_splits, tokenize_example
from ..inference import adapter_dir, agreement, eval_prompts, load_for_inference, measure_generation
from ..layout import RunLayout
from ..models import load_tokenizer, memory_footprint_gib, resolve_dtype
from ..report import markdown_table
from ..rundir import Run, hardware, peak_memory_gib, refuse_existing, reset_peak_memory
from .infer import read_prompts_file

REFERENCE = InferenceMode.adapter
COLUMNS = [
    "mode",
    "load_s",
    "ttft_s",
    "tokens_per_s",
    "peak_memory_gib",
    "footprint_gib",
    "exact_match",
    "max_abs_logit_diff",
    "mean_kl",
    "eval_perplexity",
    "new_tokens",
]


# ---------------------------------------------------------------- report


def markdown(rows: list[dict], header: str) -> str:
    return markdown_table(rows, COLUMNS, header)


def run(cfg: Config, run: Run) -> list[dict]:
    inf = cfg.inference
    modes = [REFERENCE] + [
        m for m in dict.fromkeys(inf.modes) if m is not REFERENCE
    ]  # validate(): it is there
    layout = RunLayout(run.dir)
    refuse_existing(
        [layout.comparison_csv, layout.comparison_md, layout.comparison_generations],
        "run the comparison in a new job directory so that it is kept.",
    )
    # Exact match only means something for deterministic decoding: the comparison always decodes greedily.
    gen = OmegaConf.merge(cfg.generation, {"do_sample": False})

    # ---- the same prompts and eval examples for every mode
    tokenizer = load_tokenizer(str(adapter_dir(run.source)), cfg.model.trust_remote_code)
    if inf.prompts_file:
        items = read_prompts_file(inf.prompts_file, cfg.paths.root, cfg, tokenizer)[: inf.num_prompts]
    else:
        items = eval_prompts(cfg, tokenizer, inf.num_prompts)
    prompts = [it["prompt"] for it in items]
    examples = [tokenize_example(row, tokenizer, cfg.dataset) for row in load_splits(cfg).eval]
    examples = [e for e in examples if e["trainable"]]

    rows, outputs_by_mode, reference_logits = [], {}, None
    for mode in modes:
        reset_peak_memory()
        t0 = time.perf_counter()
        model, tok = load_for_inference(cfg, run.source, mode)
        load_s = time.perf_counter() - t0
        stats, answers, logits = measure_generation(
            model, tok, prompts, gen, inf.batch_size, examples, tok.pad_token_id, inf.agreement_examples
        )
        outputs_by_mode[mode.value] = answers
        ppl = stats["eval_perplexity"]
        row = {
            "mode": mode.value,
            "load_s": load_s,
            "ttft_s": stats["ttft_s"],
            "tokens_per_s": stats["tokens_per_s"],
            "peak_memory_gib": peak_memory_gib(),
            "footprint_gib": memory_footprint_gib(model),
            "eval_perplexity": ppl,
            "new_tokens": stats["new_tokens"],
        }
        if mode is REFERENCE:
            reference_logits = logits
            row |= {"exact_match": 1.0, "max_abs_logit_diff": 0.0, "mean_kl": 0.0}
        else:
            ref_out = outputs_by_mode[REFERENCE.value]
            max_diff, kl = agreement(reference_logits, logits)
            row |= {
                "exact_match": sum(a == b for a, b in zip(ref_out, outputs_by_mode[mode.value], strict=True))
                / len(ref_out),
                "max_abs_logit_diff": max_diff,
                "mean_kl": kl,
            }
        rows.append(row)
        print(
            f"{mode.value}: loaded in {load_s:.1f} s, {row['tokens_per_s']:.1f} tokens/s, "
            f"perplexity {ppl:.3f}",
            flush=True,
        )
        del model, logits
        gc.collect()

    # ---- write
    merge_report = RunLayout(run.source).merge_report
    merge_base = json.loads(merge_report.read_text()).get("merge/base") if merge_report.is_file() else None
    q = cfg.quantization
    header = (
        f"Inference modes of {run.source.name}: model {cfg.model.name_or_path}, quantization "
        f"{q.method.value}{' (double quant)' if q.double_quant else ''}, dtype "
        f"{resolve_dtype(cfg.model.dtype)}, merge.base {merge_base or '-'}, device {hardware()['device']}; "
        f"{len(prompts)} prompts, greedy, max_new_tokens {gen.max_new_tokens}, batch {inf.batch_size}; "
        f"agreement over {sum(len(x) for x in reference_logits)} positions of {len(reference_logits)} eval "
        f"examples; perplexity over {len(examples)} eval examples. Reference: adapter."
    )
    table = markdown(rows, header)
    with layout.comparison_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    layout.comparison_md.write_text(table)
    with layout.comparison_generations.open("w", encoding="utf-8") as f:
        for i, item in enumerate(items):
            record = {"message": item["message"], "reference": item["reference"]}
            record |= {m: outs[i] for m, outs in outputs_by_mode.items()}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    run.log({f"compare/{r['mode']}/{k}": v for r in rows for k, v in r.items() if k != "mode"})
    print("\n" + table, flush=True)
    return rows
