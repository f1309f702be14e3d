"""Infer: load a trained run in one inference mode, answer a set of prompts, write generations.jsonl.

`python -m qlora_lab pipeline=infer run_dir=RUN inference=merged|adapter|merge_and_unload|base
generation=greedy|sampling` Prompts come from inference.prompts_file (one a line, or JSONL) or from the
dataset's eval split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import set_seed

from ..config import Config, ConfigError, DataFormat, InferenceMode
from ..data import prompt_and_reference, to_conversations
from ..data_formats import detect
from ..inference import eval_prompts, generate, load_for_inference
from ..layout import RunLayout
from ..models import memory_footprint_gib
from ..rundir import Run, refuse_existing


def read_prompts_file(path_str: str, root: str, cfg: Config, tokenizer) -> list[dict]:
    """Generation tasks (data.prompt_and_reference) for the prompts file's rows."""
    return [
        prompt_and_reference(row, tokenizer, cfg.dataset) for row in read_prompt_rows(path_str, root, cfg)
    ]


def read_prompt_rows(path_str: str, root: str, cfg: Config) -> list[dict]:
    """The prompts file's rows as conversations, checked (no tokenizer needed: runs before any model loads).
    Plain text: one user message a line. JSONL: {"prompt": ..., "reference": ...} or a record in any dataset
    format (detected from the first such line); a conversation ending in an assistant turn has it as its
    reference."""
    path = next((p for p in (Path(path_str).expanduser(), Path(root) / path_str) if p.is_file()), None)
    if path is None:
        raise ConfigError(
            f"inference.prompts_file={path_str}: no such file; give a text file (one prompt a line) "
            f"or a JSONL file with a `prompt` field."
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors write one) is dropped
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"inference.prompts_file={path}: line {line} is not UTF-8 text (byte {e.start}); "
            f"save the file as UTF-8."
        ) from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"inference.prompts_file={path} holds no prompts; write one prompt a line.")
    if path.suffix.lower() != ".jsonl":
        return [{"messages": [{"role": "user", "content": line.strip()}], "tools": None} for line in lines]
    rows, records, numbers = [], [], []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(
                f"inference.prompts_file={path}: line {i} is not valid JSON; write one JSON object a line."
            ) from None
        if not isinstance(record, dict):
            raise ConfigError(
                f"inference.prompts_file={path}: line {i} is not a JSON object; write one object a "
                f'line, e.g. {{"prompt": ...}}.'
            )
        if "prompt" not in record and detect(record, cfg.dataset.columns) is None:
            raise ConfigError(
                f"inference.prompts_file={path}: line {i} has neither a `prompt` field nor a dataset "
                f"record's list of turns or {cfg.dataset.columns.instruction!r} field; add one."
            )
        if "prompt" in record:
            reference = record.get("reference")
            answer = [{"role": "assistant", "content": str(reference)}] if reference is not None else []
            rows.append(
                {"messages": [{"role": "user", "content": str(record["prompt"])}, *answer], "tools": None}
            )
        else:
            rows.append(None)  # filled below, in file order
            records.append(record)
            numbers.append(i)
    if records:  # records in a dataset format: read as the training data is, whatever format the dataset has
        converted = iter(
            to_conversations(
                records,
                cfg.dataset,
                f"inference.prompts_file={path}",
                label=lambda k: f"line {numbers[k]}",
                fmt=DataFormat.auto,
                need_answer=False,
            )
        )
        rows = [row or next(converted) for row in rows]
    return rows


def run(cfg: Config, run: Run) -> list[dict]:
    inf = cfg.inference
    mode = inf.mode
    out_path = RunLayout(run.dir).generations
    refuse_existing([out_path], "run infer in a new job directory so that it is kept.")

    # ---- model and prompts
    t0 = time.perf_counter()
    model, tokenizer = load_for_inference(cfg, run.source, mode)
    load_s = time.perf_counter() - t0
    footprint = memory_footprint_gib(model)
    if inf.prompts_file:
        items = read_prompts_file(inf.prompts_file, cfg.paths.root, cfg, tokenizer)[: inf.num_prompts]
    else:
        items = eval_prompts(cfg, tokenizer, inf.num_prompts)

    # ---- generate
    set_seed(cfg.train.seed)  # reproducible sampling
    results = generate(model, tokenizer, [it["prompt"] for it in items], cfg.generation, inf.batch_size)
    before = None
    if inf.before_after and mode is not InferenceMode.base:
        del model
        base, base_tok = load_for_inference(cfg, run.source, InferenceMode.base)
        set_seed(cfg.train.seed)
        before = generate(base, base_tok, [it["prompt"] for it in items], cfg.generation, inf.batch_size)

    # ---- write and report
    with out_path.open("w", encoding="utf-8") as f:
        for i, (item, res) in enumerate(zip(items, results, strict=True)):
            record = {"mode": mode.value, "message": item["message"]} | res | {"reference": item["reference"]}
            if before:
                record["base_output"] = before[i]["output"]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    batches = {r["latency_s"]: r["ttft_s"] for r in results}  # one latency per batch
    new_tokens = sum(r["new_tokens"] for r in results)
    run.log(
        {
            "infer/load_s": load_s,
            "infer/prompts": len(results),
            "infer/new_tokens": new_tokens,
            "infer/tokens_per_s": new_tokens / sum(batches),
            "infer/ttft_s": sum(batches.values()) / len(batches),
            "infer/footprint_gib": footprint,
        }
    )
    for i, (item, res) in enumerate(zip(items[:3], results[:3], strict=False)):
        print(f"\n--- prompt {i + 1}: {item['message'][:300]}", flush=True)
        if before:
            print(f"[base]  {before[i]['output'].strip()}")
            print(f"[{mode.value}]  {res['output'].strip()}", flush=True)
        else:
            print(res["output"].strip(), flush=True)
    print(
        f"\n{len(results)} generations ({mode.value}, {new_tokens} new tokens, "
        f"{new_tokens / sum(batches):.1f} tokens/s) -> {out_path}",
        flush=True,
    )
    return results
