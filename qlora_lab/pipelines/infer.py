"""Infer: load a trained run in one inference mode, answer a set of prompts, write generations.jsonl.

`python -m qlora_lab pipeline=infer run_dir=RUN inference=merged|adapter|merge_and_unload|base generation=greedy|sampling`
Prompts come from inference.prompts_file (one a line, or JSONL) or from the dataset's eval split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import set_seed

from ..config import Config, ConfigError, InferenceMode
from ..data import format_prompt, user_message, uses_chat_template
from ..inference import eval_prompts, generate, load_for_inference
from ..models import memory_footprint_gib
from ..rundir import Run


def read_prompts_file(path_str: str, root: str, cfg: Config, tokenizer) -> list[dict]:
    """Plain text: one user message a line. JSONL: {"prompt": ...} or a dataset record (instruction/input/output)."""
    return [{"prompt": format_prompt(row, tokenizer, cfg.dataset), "reference": row["output"], "row": row}
            for row in read_prompt_rows(path_str, root, cfg)]


def read_prompt_rows(path_str: str, root: str, cfg: Config) -> list[dict]:
    """The prompts file's rows, checked (no tokenizer needed: runs before any model loads)."""
    path = next((p for p in (Path(path_str).expanduser(), Path(root) / path_str) if p.is_file()), None)
    if path is None:
        raise ConfigError(f"inference.prompts_file={path_str}: no such file; give a text file (one prompt a line) "
                          f"or a JSONL file with a `prompt` field.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"inference.prompts_file={path}: line {line} is not UTF-8 text (byte {e.start}); "
                          f"save the file as UTF-8.") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"inference.prompts_file={path} holds no prompts; write one prompt a line.")
    cols = cfg.dataset.columns
    rows = []
    for i, line in enumerate(lines, 1):
        if path.suffix.lower() != ".jsonl":
            rows.append({"instruction": line.strip(), "input": "", "output": None})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"inference.prompts_file={path}: line {i} is not valid JSON; write one JSON object "
                              f"a line.") from None
        if isinstance(record, dict) and "prompt" in record:
            rows.append({"instruction": str(record["prompt"]), "input": "", "output": record.get("reference")})
        elif isinstance(record, dict) and cols.instruction in record:
            rows.append({"instruction": str(record[cols.instruction]),
                         "input": str(record.get(cols.input) or "") if cols.input else "",
                         "output": record.get(cols.output)})
        else:
            raise ConfigError(f"inference.prompts_file={path}: line {i} has neither a `prompt` nor a "
                              f"{cols.instruction!r} field; add one.")
    return rows


def run(cfg: Config, run: Run) -> list[dict]:
    inf = cfg.inference
    mode = inf.mode
    out_path = run.dir / "generations.jsonl"
    if out_path.exists():
        raise ConfigError(f"{out_path} already exists; run infer in a new job directory so that it is kept.")

    # ---- model and prompts
    t0 = time.perf_counter()
    model, tokenizer = load_for_inference(cfg, run.source, mode)
    load_s = time.perf_counter() - t0
    footprint = memory_footprint_gib(model)
    if inf.prompts_file:
        items = read_prompts_file(inf.prompts_file, cfg.paths.root, cfg, tokenizer)[: inf.num_prompts]
    else:
        items = eval_prompts(cfg, tokenizer, inf.num_prompts)
    special = not uses_chat_template(tokenizer, cfg.dataset.template)  # as data.prompt_ids: plain text gets BOS

    # ---- generate
    set_seed(cfg.train.seed)  # reproducible sampling
    results = generate(model, tokenizer, [it["prompt"] for it in items], cfg.generation, inf.batch_size, special)
    before = None
    if inf.before_after and mode is not InferenceMode.base:
        del model
        base, base_tok = load_for_inference(cfg, run.source, InferenceMode.base)
        set_seed(cfg.train.seed)
        before = generate(base, base_tok, [it["prompt"] for it in items], cfg.generation, inf.batch_size, special)

    # ---- write and report
    with out_path.open("w", encoding="utf-8") as f:
        for i, (item, res) in enumerate(zip(items, results, strict=True)):
            record = {"mode": mode.value, "message": user_message(item["row"])} | res | {"reference": item["reference"]}
            if before:
                record["base_output"] = before[i]["output"]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    batches = {r["latency_s"]: r["ttft_s"] for r in results}  # one latency per batch
    new_tokens = sum(r["new_tokens"] for r in results)
    run.log({"infer/load_s": load_s, "infer/prompts": len(results), "infer/new_tokens": new_tokens,
             "infer/tokens_per_s": new_tokens / sum(batches), "infer/ttft_s": sum(batches.values()) / len(batches),
             "infer/footprint_gib": footprint})
    for i, (item, res) in enumerate(zip(items[:3], results[:3], strict=False)):
        print(f"\n--- prompt {i + 1}: {user_message(item['row'])[:300]}", flush=True)
        if before:
            print(f"[base]  {before[i]['output'].strip()}")
            print(f"[{mode.value}]  {res['output'].strip()}", flush=True)
        else:
            print(res["output"].strip(), flush=True)
    print(f"\n{len(results)} generations ({mode.value}, {new_tokens} new tokens, "
          f"{new_tokens / sum(batches):.1f} tokens/s) -> {out_path}", flush=True)
    return results
