"""Data: a file -> checked rows -> seeded train/eval split -> prompt text -> tokens with the prompt masked."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset

from .config import Config, ConfigError, DatasetConfig, Template

log = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100  # labels with this value are left out of the loss


@dataclass
class Splits:
    train: Dataset  # raw rows: instruction / input / output, renamed from the file's columns
    eval: Dataset
    files: list[Path]


# ---------------------------------------------------------------- loading and checking

def resolve_file(path: str, root: str, field_name: str) -> Path:
    p = Path(path).expanduser()
    for candidate in (p, Path(root) / p):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{field_name}={path}: no such file; give a path to a JSON, JSONL, CSV or Parquet file.")


def load_rows(path: Path, field_name: str) -> Dataset:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"{field_name}={path} has an unsupported extension; use .json, .jsonl, .csv or .parquet.")
    if path.stat().st_size == 0 or (builder == "json" and path.read_text(errors="ignore").strip() in ("", "[]")):
        raise ConfigError(f"{field_name}={path} holds no records; give a file with at least one example.")
    try:
        ds = load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for a malformed file, mostly "An error occurred ..."
        problem = diagnose_file(path, builder) or str(e).splitlines()[0]
        raise ConfigError(f"{field_name}={path} could not be read as {builder}: {problem}") from None
    if len(ds) == 0:
        raise ConfigError(f"{field_name}={path} holds no records; give a file with at least one example.")
    return ds


def normalise(ds: Dataset, cfg: DatasetConfig, path: Path) -> Dataset:
    """Map the file's columns to instruction/input/output, checking every record has what we need."""
    cols = cfg.columns
    required = {"instruction": cols.instruction, "output": cols.output}
    check_record_shapes(ds, cfg, path)
    for role, col in required.items():
        if col not in ds.column_names:
            raise ConfigError(f"{path}: no column {col!r} (dataset.columns.{role}); the file has "
                              f"{', '.join(ds.column_names)}; set dataset.columns.{role} to one of them.")
    for i, row in enumerate(ds):
        for role, col in required.items():
            value = row[col]
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ConfigError(f"{path}: record {i} has an empty or missing {col!r} field "
                                  f"(dataset.columns.{role}); fix or remove that record.")
    out = {
        "instruction": [str(v) for v in ds[cols.instruction]],
        # `input` is optional: many Alpaca-style files leave the column out when it is always empty
        "input": [str(v or "") for v in ds[cols.input]] if cols.input in ds.column_names else [""] * len(ds),
        "output": [str(v) for v in ds[cols.output]],
    }
    return Dataset.from_dict(out)


def diagnose_file(path: Path, builder: str) -> str | None:
    """Why `datasets` could not read a file, as the line to fix (it says only "An error occurred ...")."""
    import json

    raw = path.read_bytes()
    if builder not in ("json", "csv"):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return f"line {line} is not UTF-8 text (byte {e.start}); save the file as UTF-8."
    if builder != "json":
        return None
    if text.lstrip().startswith("["):  # one JSON document (a list of records)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return (f"line {e.lineno}, column {e.colno}: {e.msg} (a truncated or malformed file); fix the JSON, "
                    f"a list of records.")
        return None
    for number, line in enumerate(text.splitlines(), 1):  # JSON Lines: one record a line
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number} is not valid JSON ({e.msg}, column {e.colno}); write one JSON object a line."
    return None


def check_record_shapes(ds: Dataset, cfg: DatasetConfig, path: Path) -> None:
    """Records must be flat text fields. A list or dict in a mapped column would be trained on as its Python str()."""
    cols = cfg.columns
    if len(ds.column_names) == 1 and cols.instruction not in ds.column_names:
        only = ds.column_names[0]
        value = ds[0][only]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            raise ConfigError(f"{path} is one JSON object whose {only!r} key holds the records; write the records "
                              f"as a top-level JSON list (or JSON Lines, one record a line).")
    for role, col in (("instruction", cols.instruction), ("input", cols.input), ("output", cols.output)):
        if col is None or col not in ds.column_names:
            continue
        for i, value in enumerate(ds[col]):
            if isinstance(value, (list, dict)):
                kind = "list" if isinstance(value, list) else "dict"
                raise ConfigError(f"{path}: record {i}'s {col!r} column (dataset.columns.{role}) holds a {kind}, not "
                                  f"text (a conversation?); map dataset.columns.{role} to a text column: "
                                  f"conversation formats such as ShareGPT are not read.")


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def load_splits(cfg: Config) -> Splits:
    """Seeded split. The eval set never depends on dataset.size, and a smaller size is a prefix of a larger one."""
    d = cfg.dataset
    train_file = resolve_file(d.path, cfg.paths.root, "dataset.path")
    rows = normalise(load_rows(train_file, "dataset.path"), d, train_file).shuffle(seed=d.seed)
    files = [train_file]
    if d.eval_path:
        eval_file = resolve_file(d.eval_path, cfg.paths.root, "dataset.eval_path")
        eval_rows = normalise(load_rows(eval_file, "dataset.eval_path"), d, eval_file).shuffle(seed=d.seed)
        eval_rows = eval_rows.select(range(min(d.eval_size, len(eval_rows))))
        pool = rows
        files.append(eval_file)
    else:
        if len(rows) <= d.eval_size:
            raise ConfigError(f"dataset.path={d.path} has {len(rows)} records, not more than dataset.eval_size="
                              f"{d.eval_size}; lower dataset.eval_size or give dataset.eval_path.")
        eval_rows = rows.select(range(d.eval_size))
        pool = rows.select(range(d.eval_size, len(rows)))
    size = d.size or len(pool)
    if size > len(pool):
        raise ConfigError(f"dataset.size={size} but {d.path} has only {len(pool)} training records after holding out "
                          f"the eval split; lower dataset.size.")
    return Splits(train=pool.select(range(size)), eval=eval_rows, files=files)


# ---------------------------------------------------------------- prompts and tokens

def user_message(row: dict) -> str:
    return row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"


def uses_chat_template(tokenizer, template: Template | str) -> bool:
    return Template(template) is Template.chat and bool(getattr(tokenizer, "chat_template", None))


def format_prompt(row: dict, tokenizer, d: DatasetConfig) -> str:
    """The text the model sees before its answer (also used for generation at inference time)."""
    if uses_chat_template(tokenizer, d.template):
        messages = ([{"role": "system", "content": d.system_prompt}] if d.system_prompt else [])
        messages.append({"role": "user", "content": user_message(row)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        text += f"### Input:\n{row['input']}\n\n"
    return text + "### Answer:\n"


def prompt_ids(prompt: str, tokenizer, d: DatasetConfig) -> list[int]:
    # A chat template already writes any BOS it needs; plain text gets the tokenizer's special tokens.
    return tokenizer(prompt, add_special_tokens=not uses_chat_template(tokenizer, d.template))["input_ids"]


def tokenize_example(row: dict, tokenizer, d: DatasetConfig) -> dict:
    p_ids = prompt_ids(format_prompt(row, tokenizer, d), tokenizer, d)
    r_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = p_ids + r_ids
    labels = ids.copy() if d.train_on_prompt else [IGNORE_INDEX] * len(p_ids) + r_ids
    truncated = len(ids) > d.max_seq_length
    ids, labels = ids[: d.max_seq_length], labels[: d.max_seq_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "truncated": truncated, "trainable": any(t != IGNORE_INDEX for t in labels)}


def tokenize_split(rows: Dataset, tokenizer, d: DatasetConfig, split: str) -> tuple[Dataset, dict]:
    """Tokenize; count truncated examples and drop those whose whole response was cut off."""
    ds = rows.map(lambda r: tokenize_example(r, tokenizer, d), remove_columns=rows.column_names,
                  desc=f"tokenizing {split}")
    truncated = sum(ds["truncated"])
    kept = ds.filter(lambda r: r["trainable"])
    dropped = len(ds) - len(kept)
    if len(kept) == 0:
        raise ConfigError(f"Every {split} example's prompt is longer than dataset.max_seq_length={d.max_seq_length}; "
                          f"raise dataset.max_seq_length.")
    if truncated:
        log.warning("%s: %d of %d examples truncated to dataset.max_seq_length=%d (%d dropped: nothing of the "
                    "response was left)", split, truncated, len(ds), d.max_seq_length, dropped)
    stats = {f"data/{split}_examples": len(kept), f"data/{split}_truncated": truncated,
             f"data/{split}_dropped": dropped, f"data/{split}_tokens": sum(len(x) for x in kept["input_ids"])}
    kept = kept.remove_columns(["truncated", "trainable"])
    if d.pack:
        kept = pack_examples(kept, d.max_seq_length)
        stats[f"data/{split}_rows"] = len(kept)
        stats[f"data/{split}_row_fill"] = stats[f"data/{split}_tokens"] / (len(kept) * d.max_seq_length)
    return kept, stats


PACK_WINDOW = 64  # open rows an example may join: bounds packing time, keeps rows close to the data order


def pack_examples(ds: Dataset, max_len: int) -> Dataset:
    """Packing that keeps examples apart: whole examples fill rows of up to `max_len` tokens, each joining the first
    of the last PACK_WINDOW rows with room for it (first fit: rows come out ~99% full on Alpaca lengths, against
    ~88% when a row is closed at the first example that does not fit). Each row keeps its examples' lengths, so
    that the collator can restart position ids and attention at every boundary. Written by hand: transformers'
    DataCollatorWithFlattening flattens a batch of examples, but has no notion of fixed-size rows to batch by."""
    rows: list[dict] = []
    for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True):
        start = max(0, len(rows) - PACK_WINDOW)
        row = next((r for r in rows[start:] if r["size"] + len(ids) <= max_len), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "lengths": [], "size": 0}
            rows.append(row)
        row["input_ids"] += ids
        row["labels"] += labels
        row["lengths"].append(len(ids))
        row["size"] += len(ids)
    return Dataset.from_list([{k: r[k] for k in ("input_ids", "labels", "lengths")} for r in rows])


class PackedCollator:
    """A batch of packed rows -> one [1, tokens] sequence with position ids restarting at every example, no
    attention mask and no padding between examples (transformers' DataCollatorWithFlattening, fed the rows'
    examples). The attention implementations read the restarts as boundaries; the first label of each example is
    -100, so no token is predicted across one.

    The sequence is then extended to a multiple of ALIGN tokens: SDPA's fused kernels need an aligned mask, and an
    unaligned length fell back to the unfused kernel (measured on 8B shapes: 0.99 s steps instead of 0.69 s). The
    extension continues the last example with `pad_id` tokens, labelled -100: causal attention keeps them out of
    every real token's view, so no real loss changes, and the Trainer's non-padding count leaves them out."""

    ALIGN = 64

    def __init__(self, pad_id: int):
        from transformers import DataCollatorWithFlattening

        self.pad_id = pad_id
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        examples = []
        for row in rows:
            start = 0
            for n in row["lengths"]:
                examples.append({"input_ids": row["input_ids"][start:start + n],
                                 "labels": row["labels"][start:start + n]})
                start += n
        batch = self.flatten(examples)
        extra = -batch["input_ids"].shape[1] % self.ALIGN
        if extra:
            last = batch["position_ids"][0, -1].item()
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, extra), self.pad_id)], 1)
            batch["labels"] = torch.cat([batch["labels"], torch.full((1, extra), IGNORE_INDEX)], 1)
            batch["position_ids"] = torch.cat([batch["position_ids"], last + 1 + torch.arange(extra)[None]], 1)
        return batch


def mean_context(ds: Dataset) -> float:
    """Mean number of tokens each token attends to (itself and those before it in its example): the attention
    term of the FLOPs per token. Packed rows count per example, since attention stops at each boundary."""
    lengths = [n for row in ds["lengths"] for n in row] if "lengths" in ds.column_names else \
        [len(ids) for ids in ds["input_ids"]]
    return sum(n * (n + 1) / 2 for n in lengths) / max(sum(lengths), 1)
