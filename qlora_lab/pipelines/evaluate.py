"""Evaluate: perplexity, ROUGE, BLEU-4 and GSM8K accuracy of each model in eval.modes, as a before/after
table.

For every mode (e.g. `base` = before fine-tuning, `adapter` = after) on the same eval split:
  perplexity  exp(mean NLL over the response tokens of the eval split), token-weighted
  rouge/bleu  greedy (or cfg.generation) outputs for the first eval.max_samples prompts vs the references
  accuracy    GSM8K: the number after `####` matches the reference's (strict); also the last number (lenient)
The mode named by inference.mode writes `eval/<metric>`; every other mode `eval_<mode>/<metric>`.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import time

from ..config import Config, EvalMetric, InferenceMode, Language
from ..data import load_splits, tokenize_split
from ..inference import eval_prompts, generate, load_for_inference, teacher_forced
from ..layout import RunLayout
from ..metrics import bleu4, detect_language, gsm8k_accuracy, rouge
from ..rundir import Run

log = logging.getLogger(__name__)

# Rows of the before/after table, in order: (metric key, label, higher is better)
TABLE_ROWS = [
    ("perplexity", "perplexity", False),
    ("rouge1", "ROUGE-1", True),
    ("rouge2", "ROUGE-2", True),
    ("rougeL", "ROUGE-L", True),
    ("bleu4", "BLEU-4", True),
    ("accuracy", "accuracy (####)", True),
    ("accuracy_lenient", "accuracy (last number)", True),
    ("answer_format_rate", "answers with ####", True),
]


def perplexity(model, tokenizer, cfg: Config) -> float:
    """Token-weighted perplexity of the eval split's responses (labels as in training: the prompt is
    masked)."""
    eval_ds, _ = tokenize_split(load_splits(cfg).eval, tokenizer, cfg.dataset, "eval")
    return teacher_forced(model, list(eval_ds), cfg.eval.batch_size, tokenizer.pad_token_id, keep=0)[0]


def evaluate_mode(
    cfg: Config, run: Run, mode: InferenceMode, metrics: list[EvalMetric]
) -> tuple[dict, list[dict]]:
    model, tokenizer = load_for_inference(cfg, run.source, mode)
    scores: dict[str, float] = {}
    # seconds per part, so that a slow evaluation says where its time went
    t0 = time.perf_counter()
    if EvalMetric.perplexity in metrics:
        scores["perplexity"] = perplexity(model, tokenizer, cfg)
        scores["perplexity_s"] = time.perf_counter() - t0
    generations: list[dict] = []
    if {EvalMetric.rouge, EvalMetric.bleu, EvalMetric.accuracy} & set(metrics):
        examples = eval_prompts(cfg, tokenizer, cfg.eval.max_samples)
        t0 = time.perf_counter()
        batch = cfg.eval.generation_batch_size or cfg.eval.batch_size
        outputs = generate(model, tokenizer, [e["prompt"] for e in examples], cfg.generation, batch)
        scores["generation_s"] = time.perf_counter() - t0
        scores["generated_tokens"] = sum(o["new_tokens"] for o in outputs)
        predictions = [o["output"] for o in outputs]
        references = [e["reference"] for e in examples]
        language = (
            detect_language(references) if cfg.eval.language is Language.auto else cfg.eval.language.value
        )
        if EvalMetric.rouge in metrics:
            scores |= rouge(predictions, references, language)
        if EvalMetric.bleu in metrics:
            scores["bleu4"] = bleu4(predictions, references, language)
        if EvalMetric.accuracy in metrics and all(
            "####" in r for r in references
        ):  # GSM8K-style references only
            scores |= gsm8k_accuracy(predictions, references)
        generations = [
            {
                "mode": mode.value,
                "prompt": e["prompt"],
                "reference": e["reference"],
                "output": o["output"],
                "new_tokens": o["new_tokens"],
            }
            for e, o in zip(examples, outputs, strict=True)
        ]
    del model
    gc.collect()
    return scores, generations


def table(results: dict[str, dict], main: str) -> tuple[list[str], list[list[str]]]:
    """Rows of metric x mode, plus `change` (main mode minus base) when the base was evaluated."""
    modes = list(results)
    header = ["metric", *modes] + (["change"] if "base" in results and main != "base" else [])
    rows = []
    for key, label, _ in TABLE_ROWS:
        if not any(key in r for r in results.values()):
            continue
        row = [label] + [f"{results[m][key]:.2f}" if key in results[m] else "" for m in modes]
        if len(header) > len(modes) + 1:
            row.append(f"{results[main][key] - results['base'][key]:+.2f}")
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def run(cfg: Config, run: Run) -> dict:
    main = cfg.inference.mode.value
    modes = list(dict.fromkeys(cfg.eval.modes))
    if cfg.inference.mode not in modes:
        modes.append(cfg.inference.mode)

    results: dict[str, dict] = {}
    all_generations: list[dict] = []
    for mode in modes:
        print(f"evaluating {mode.value} ...", flush=True)
        results[mode.value], generations = evaluate_mode(cfg, run, mode, list(cfg.eval.metrics))
        all_generations += generations
        prefix = "eval" if mode.value == main else f"eval_{mode.value}"
        run.log({f"{prefix}/{k}": v for k, v in results[mode.value].items()})

    layout = RunLayout(run.dir)
    with open(layout.eval_generations, "w") as f:
        for g in all_generations:
            f.write(json.dumps(g, ensure_ascii=False) + "\n")
    header, rows = table(results, main)
    with open(layout.evaluation_csv, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    text = markdown(header, rows)
    n_gen = len(all_generations) // len(modes)
    note = (
        f"\nEval split: {cfg.dataset.name}, perplexity over its response tokens; generation metrics on "
        f"{n_gen} prompts ({'sampling' if cfg.generation.do_sample else 'greedy'}, max "
        f"{cfg.generation.max_new_tokens} new tokens). Scores are 0-100 except perplexity (lower is "
        "better).\n"
    )
    layout.evaluation_md.write_text(f"# Evaluation: {', '.join(results)}\n\n" + text + note)
    print("\n" + text + note, flush=True)
    return results
