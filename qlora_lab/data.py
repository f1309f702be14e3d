"""Data: a file in one of four formats -> conversations -> seeded train/eval split -> the text the model sees,
rendered by one function for every stage -> tokens whose labels cover the assistant turns only.

The canonical row, which every format converts to and every stage reads:
    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str,
                   # optional:
                   "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}],
                   "name": str, "tool_call_id": str,  # optional, on tool results
                   "loss_weight": 0},  # optional, on an assistant turn left out of the loss
                  ...],
     "tools": [function schema, ...] | None}
These are the messages and tools of transformers' chat templates, so a row renders with `apply_chat_template`
as is.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, load_dataset

from .config import Config, ConfigError, DataFormat, DatasetConfig, Template, TrainOn
from .data_formats import FORMATS, detect
from .models import OncePerMessage

log = logging.getLogger(__name__)
log.addFilter(OncePerMessage())  # the preflight and the stage both read the data: its format is told once

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100  # labels with this value are left out of the loss


@dataclass
class Splits:
    # Canonical rows as plain dicts, not Arrow tables: Arrow gives every dict in a column the union of all
    # records' keys, which would add other records' keys (as nulls) to tool-call arguments and tool schemas.
    train: list[dict]
    eval: list[dict]
    files: list[Path]


# ---------------------------------------------------------------- loading and checking


def resolve_file(path: str, root: str, field_name: str) -> Path:
    p = Path(path).expanduser()
    for candidate in (p, Path(root) / p):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"{field_name}={path}: no such file; give a path to a JSON, JSONL, CSV or Parquet file."
    )


def read_records(path: Path, field_name: str) -> list[dict]:
    """The file's records, each a dict exactly as written. JSON is read with the json module (records keep
    their own keys, see Splits); CSV and Parquet with `datasets`."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(
            f"{field_name}={path} has an unsupported extension; use .json, .jsonl, .csv or .parquet."
        )
    if path.stat().st_size == 0:
        raise ConfigError(f"{field_name}={path} holds no records; give a file with at least one example.")
    if builder == "json":
        records = read_json_records(path, field_name)
    else:
        try:
            records = load_dataset(builder, data_files=str(path), split="train").to_list()
        except (
            Exception
        ) as e:  # datasets raises many types for a malformed file, mostly "An error occurred ..."
            problem = diagnose_file(path, builder) or str(e).splitlines()[0]
            raise ConfigError(f"{field_name}={path} could not be read as {builder}: {problem}") from None
        # an empty cell of a numeric column reads as NaN: a missing value, not the text "nan"
        records = [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in records
        ]
    if not records:
        raise ConfigError(f"{field_name}={path} holds no records; give a file with at least one example.")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError(
                f"{field_name}={path}: record {i} is a JSON {type(record).__name__}, not an object; "
                f'write one object (e.g. {{"instruction": ..., "output": ...}}) a record.'
            )
    return records


def read_json_records(path: Path, field_name: str) -> list:
    """A JSON list of records, one JSON object, or JSON Lines (one object a line, whatever the extension)."""
    problem = diagnose_file(path, "json")
    if problem:
        raise ConfigError(f"{field_name}={path} could not be read as json: {problem}")
    text = path.read_text(
        encoding="utf-8-sig"
    )  # -sig: a byte-order mark (Windows editors write one) is dropped
    if text.lstrip().startswith("["):
        return json.loads(text)
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def diagnose_file(path: Path, builder: str) -> str | None:
    """Why a file cannot be read, as the line to fix (`datasets` says only "An error occurred ...")."""
    raw = path.read_bytes()
    if builder not in ("json", "csv"):
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return f"line {line} is not UTF-8 text (byte {e.start}); save the file as UTF-8."
    if builder == "csv":
        return ragged_csv_line(text)
    if text.lstrip().startswith("["):  # one JSON document (a list of records)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return (
                f"line {e.lineno}, column {e.colno}: {e.msg} (a truncated or malformed file); fix the JSON, "
                f"a list of records."
            )
        return None
    try:  # one JSON object
        json.loads(text)
        return None
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):  # JSON Lines: one record a line
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as e:
            return (
                f"line {number} is not valid JSON ({e.msg}, column {e.colno}); write one JSON object a line."
            )
    return None


def ragged_csv_line(text: str) -> str | None:
    """The first CSV row with more fields than the header (pandas stops there, `datasets` names no line)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    for row in reader:
        if len(row) > len(header):
            return (
                f"line {reader.line_num} has {len(row)} fields but the header has {len(header)}; put quotes "
                f"around a value that holds a comma, or fix that line."
            )
    return None


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------- formats -> canonical rows (qlora_lab/data_formats)


def describe(fmt: DataFormat, key: str) -> str:
    return FORMATS[fmt].describe(key)


def to_conversations(
    records: list[dict],
    d: DatasetConfig,
    source: str,
    label: Callable[[int], str] = lambda i: f"record {i}",
    fmt: DataFormat | None = None,
    need_answer: bool = True,
) -> list[dict]:
    """Every record as a canonical row. Format `auto` (dataset.format unless `fmt` is given) takes the format
    of the first record and logs it; a record in another format is refused, as is any record the converter
    cannot read. `need_answer=False` (prompts to generate for) accepts conversations with no assistant
    turn."""
    cols = d.columns
    fmt = DataFormat(fmt or d.format)
    if len(records) == 1 and len(records[0]) == 1 and detect(records[0], cols) is None:
        only, value = next(iter(records[0].items()))
        if isinstance(value, list) and value and isinstance(value[0], dict):
            raise ConfigError(
                f"{source} is one JSON object whose {only!r} key holds the records; write the records "
                f"as a top-level JSON list (or JSON Lines, one record a line)."
            )
    detected = fmt is DataFormat.auto
    if detected:
        found = detect(records[0], cols)
        if found is None:
            keys = ", ".join(map(str, records[0])) or "none"
            raise ConfigError(
                f"{source}: {label(0)} (keys: {keys}) is in none of the formats read: "
                f"{', '.join(spec.needs_line(cols) for spec in FORMATS.values())}; set dataset.format "
                f"and dataset.columns to match."
            )
        fmt = found[0]
        log.info("dataset.format=auto: %s is %s, detected from its first record", source, describe(*found))
    spec = FORMATS[fmt]
    if not detected and spec.check:
        spec.check(records, d, source)
    rows = []
    for i, record in enumerate(records):
        where = f"{source}: {label(i)}"
        found = detect(record, cols)
        if found and found[0] is not fmt:
            why = (
                f"but {label(0)} made the file {fmt.value}" if detected else f"not dataset.format={fmt.value}"
            )
            raise ConfigError(
                f"{where} is in {describe(*found)} format, {why}; a file must hold one format: "
                f"convert that record or split the file (or set dataset.format to the file's format)."
            )
        key = found[1] if found and spec.turns_column else cols.messages or spec.turns_column
        row = spec.convert(record, cols, key, where, need_answer)
        check_conversation(row["messages"], where, key or cols.history or "history", need_answer)
        if need_answer:
            check_trained(row["messages"], where, key, d.train_on)
        rows.append(row)
    return rows


def check_conversation(messages: list[dict], where: str, key: str, need_answer: bool = True) -> None:
    """What every format must give: turns, a user turn before the first answer, an assistant turn to train on,
    and no empty user or assistant turn."""
    if not messages or all(m["role"] == "system" for m in messages):
        raise ConfigError(
            f"{where}'s {key!r} holds no turns (an empty conversation); fix or remove that record."
        )
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] == "assistant":
        raise ConfigError(
            f"{where}'s {key!r} starts with an assistant turn; a user turn must come first, so fix or "
            f"remove that record."
        )
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(
            f"{where}'s {key!r} has no assistant turn, so nothing in it could be trained or scored; "
            f"add one or remove that record."
        )
    for j, m in enumerate(messages):
        if m["role"] in ("user", "assistant") and not m["content"].strip() and not m.get("tool_calls"):
            raise ConfigError(
                f"{where}'s {key!r} has an empty {m['role']} turn (turn {j} of the conversation); fix "
                f"or remove that record."
            )


def check_trained(messages: list[dict], where: str, key: str | None, train_on) -> None:
    """A conversation whose every trained answer has loss_weight 0 would train nothing: say so, naming the
    field."""
    answers = [m for m in messages if m["role"] == "assistant"]
    chosen = answers if TrainOn(train_on) is TrainOn.all_assistant else answers[-1:]
    if all(m.get("loss_weight") == 0 for m in chosen):
        which = (
            "its last assistant turn, the one dataset.train_on=last_assistant trains,"
            if TrainOn(train_on) is TrainOn.last_assistant and len(answers) > 1
            else "every assistant turn"
        )
        raise ConfigError(
            f"{where}'s {key!r}: {which} has loss_weight 0, so nothing in it would be trained; set a "
            f"loss_weight to 1 or remove the record."
        )


def shuffled(rows: list, seed: int) -> list:
    """The permutation datasets' Dataset.shuffle(seed=seed) draws, so that a seed gives the same split either
    way."""
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


_READ: dict[tuple, list[dict]] = {}  # (file, its content's hash, the settings that read it) -> canonical rows


def load_conversations(path: str, d: DatasetConfig, root: str, field_name: str) -> tuple[Path, list[dict]]:
    """A data file's canonical rows, read once per process: the preflight and every stage of a job share one
    read (a file changed since is read again)."""
    file = resolve_file(path, root, field_name)
    digest = hashlib.sha256(
        file.read_bytes()
    ).hexdigest()  # cheap next to the conversion; a changed file is new
    key = (str(file), digest, field_name, str(d.columns), str(d.format), str(d.train_on))
    if key not in _READ:
        if len(_READ) >= 4:  # a train and an eval file, and room for a second dataset
            del _READ[next(iter(_READ))]
        _READ[key] = to_conversations(read_records(file, field_name), d, str(file))
    return file, _READ[key]


def load_splits(cfg: Config) -> Splits:
    """Seeded split. The eval set never depends on dataset.size, and a smaller size is a prefix of a larger
    one."""
    d = cfg.dataset
    train_file, rows = load_conversations(d.path, d, cfg.paths.root, "dataset.path")
    rows = shuffled(rows, d.seed)
    files = [train_file]
    if d.eval_path:
        eval_file, eval_rows = load_conversations(d.eval_path, d, cfg.paths.root, "dataset.eval_path")
        eval_rows = shuffled(eval_rows, d.seed)[: d.eval_size]
        pool = rows
        files.append(eval_file)
    else:
        if len(rows) <= d.eval_size:
            raise ConfigError(
                f"dataset.path={d.path} has {len(rows)} records, not more than dataset.eval_size="
                f"{d.eval_size}; lower dataset.eval_size or give dataset.eval_path."
            )
        eval_rows = rows[: d.eval_size]
        pool = rows[d.eval_size :]
    size = d.size or len(pool)
    if size > len(pool):
        raise ConfigError(
            f"dataset.size={size} but {d.path} has only {len(pool)} training records after holding out "
            f"the eval split; lower dataset.size."
        )
    return Splits(train=pool[:size], eval=eval_rows, files=files)


# -------------------------------------------------------- rendering: the one place text is made for the model


def uses_chat_template(tokenizer, template: Template | str) -> bool:
    return Template(template) is Template.chat and bool(getattr(tokenizer, "chat_template", None))


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """dataset.system_prompt for a conversation that has no system turn of its own."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def calls_text(message: dict) -> str:
    """An assistant turn as text: its content, then each function call as one JSON object a line."""
    calls = [
        json.dumps(
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False
        )
        for c in message.get("tool_calls") or []
    ]
    return "\n".join([message["content"]] * bool(message["content"]) + calls)


def tools_as_text(messages: list[dict], tools: list | None, keep_calls: bool) -> list[dict]:
    """For a template that does not render tools (or tool calls): the tools go into the system turn as text,
    and each call becomes the assistant's text (calls_text). Tool results keep the role `tool`."""
    out = [
        m if keep_calls or not m.get("tool_calls") else {"role": "assistant", "content": calls_text(m)}
        for m in messages
    ]
    if tools:
        listing = (
            'You can call these functions; to call one, answer with a JSON object {"name": ..., '
            '"arguments": {...}}:\n' + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        )
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def leading_special_text(tokenizer) -> str:
    """The special tokens the tokenizer puts in front of a text by itself (e.g. Llama's BOS), written out: the
    plain rendering carries them in its text, so that every rendered text is tokenized alike (see encode)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            return "".join(tokenizer.convert_ids_to_tokens(with_special[:k]))
    return ""


PLAIN_HEADERS = {"user": "### Instruction:\n", "tool": "### Tool result:\n", "assistant": "### Answer:\n"}


def render_plain(messages: list[dict], tokenizer, add_generation_prompt: bool) -> str:
    """The plain rendering, for dataset.template=plain or a tokenizer without a chat template: a system turn
    as text, then `### Instruction:` / `### Tool result:` / `### Answer:` sections; an answer ends with
    EOS."""
    text = leading_special_text(tokenizer)
    for m in messages:
        if m["role"] == "system":
            text += f"{m['content']}\n\n"
        elif m["role"] == "assistant":
            text += f"{PLAIN_HEADERS['assistant']}{m['content']}{tokenizer.eos_token or ''}\n\n"
        else:
            text += f"{PLAIN_HEADERS[m['role']]}{m['content']}\n\n"
    return text + (PLAIN_HEADERS["assistant"] if add_generation_prompt else "")


def render(
    messages: list[dict],
    tools: list | None,
    tokenizer,
    template: Template | str,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as the model's input text, every special token written in: the chat template (tools
    passed to it when it renders them, else written as text by tools_as_text), or the plain rendering."""
    if not uses_chat_template(tokenizer, template):
        return render_plain(
            tools_as_text(messages, tools, keep_calls=False), tokenizer, add_generation_prompt
        )
    source = tokenizer.get_chat_template(None, tools)
    takes_tools = "tools" in source
    messages = tools_as_text(messages, None if takes_tools else tools, keep_calls="tool_calls" in source)
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools if takes_tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # jinja's TemplateError, or a template's own raise_exception()
        raise ConfigError(
            f"the model's chat template refused a conversation ({str(e).splitlines()[0]}); check its "
            f"roles and their order, or use dataset.template=plain."
        ) from None


def render_prompt(messages: list[dict], tokenizer, d: DatasetConfig, tools: list | None = None) -> str:
    """What every stage that generates (infer, evaluate, compare, export, chat) gives the model: the
    conversation so far (dataset.system_prompt added when it has no system turn) and the start of the
    assistant's turn."""
    return render(
        with_system(messages, d.system_prompt), tools, tokenizer, d.template, add_generation_prompt=True
    )


def encode(text: str | list[str], tokenizer, **kwargs):
    """Rendered text -> tokens. The renderer writes every special token (BOS included), so none is added
    here."""
    return tokenizer(text, add_special_tokens=False, **kwargs)


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (e.g. <|eot_id|>, <end_of_turn>), which may
    not be EOS: generation stops at it too. None without a chat template, or when it closes turns with no
    special token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    row = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "tools": None,
    }
    try:
        answer = turn_pieces(row, tokenizer, Template.chat, None, TrainOn.last_assistant)[-1][0]
    except ConfigError:
        return None
    ids = encode(answer, tokenizer)["input_ids"]
    return ids[-1] if ids and ids[-1] in special_ids(tokenizer) else None


def prompt_and_reference(row: dict, tokenizer, d: DatasetConfig) -> dict:
    """A row as a generation task: the prompt is the conversation up to its last assistant turn, the reference
    that turn (its text, function calls as JSON); a row with no assistant turn is all prompt, with no
    reference."""
    messages = row["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    context = messages if last is None else messages[:last]
    return {
        "prompt": render_prompt(context, tokenizer, d, row.get("tools")),
        "reference": None if last is None else calls_text(messages[last]),
        "message": next((m["content"] for m in reversed(context) if m["role"] == "user"), ""),
        "row": row,
    }


# ---------------------------------------------------------------- tokens and labels


def turn_pieces(
    row: dict, tokenizer, template, system_prompt: str | None, train_on
) -> list[tuple[str, bool]]:
    """The conversation's text cut into (text, trained) pieces, up to its last assistant turn. A trained piece
    is one assistant turn exactly as the template renders it, through its end-of-turn token; the whitespace
    the template puts between turns is context. Found by rendering the conversation up to each turn: the text
    before the turn (with the generation prompt) and the text through it must both begin the whole text."""
    messages = with_system(row["messages"], system_prompt)
    tools = row.get("tools")
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = answers if TrainOn(train_on) is TrainOn.all_assistant else answers[-1:]
    trained = [
        i for i in trained if messages[i].get("loss_weight") != 0
    ]  # loss_weight 0: context, not trained
    whole = render(messages[: answers[-1] + 1], tools, tokenizer, template)
    pieces, pos = [], 0
    for i in trained:
        start = render(messages[:i], tools, tokenizer, template, add_generation_prompt=True)
        through = render(messages[: i + 1], tools, tokenizer, template).rstrip()
        if not (whole.startswith(start) and whole.startswith(through) and pos <= len(start) < len(through)):
            raise ConfigError(
                f"the chat template renders a conversation's turns differently once later turns follow "
                f"(turn {i}), so its assistant turns cannot be found in the text; use "
                f"dataset.train_on=last_assistant or dataset.template=plain."
            )
        pieces += [(whole[pos : len(start)], False), (whole[len(start) : len(through)], True)]
        pos = len(through)
    return [p for p in pieces if p[0]]


def tokenize_example(row: dict, tokenizer, d: DatasetConfig) -> dict:
    """Tokens and labels of one conversation. Labels cover the trained assistant turns (dataset.train_on),
    each with the end-of-turn token its template renders (EOS is added only where a template closes a turn
    with no special token, so that generation can stop). A conversation longer than dataset.max_seq_length
    keeps whole turns from its start; when even its first turn is too long, that turn is cut at the limit."""
    eos, special = tokenizer.eos_token_id, special_ids(tokenizer)
    turns, ids, labels = (
        [],
        [],
        [],
    )  # turns: (ids, labels) of the context before an assistant turn + that turn
    for text, trained in turn_pieces(row, tokenizer, d.template, d.system_prompt, d.train_on):
        piece = encode(text, tokenizer)["input_ids"]
        if trained and piece[-1] not in special:
            piece = piece + [eos]
        ids += piece
        labels += piece if trained or d.train_on_prompt else [IGNORE_INDEX] * len(piece)
        if trained:
            turns.append((ids, labels))
            ids, labels = [], []
    ids, labels, kept, shortened = [], [], 0, False
    for turn_ids, turn_labels in turns:
        if len(ids) + len(turn_ids) > d.max_seq_length:
            if kept == 0:
                ids, labels, shortened = turn_ids[: d.max_seq_length], turn_labels[: d.max_seq_length], True
            break
        ids, labels, kept = ids + turn_ids, labels + turn_labels, kept + 1
    trainable = any(t != IGNORE_INDEX for t in labels)
    # turns_cut: answers left out whole; shortened: the first answer cut at the limit (still partly trained)
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": labels,
        "truncated": kept < len(turns),
        "turns_cut": len(turns) - kept - shortened,
        "shortened": shortened and trainable,
        "trainable": trainable,
    }


def tokenize_split(rows: list[dict], tokenizer, d: DatasetConfig, split: str) -> tuple[Dataset, dict]:
    """Tokenize; count truncated examples and the turns cut, and drop those whose whole response was cut
    off."""
    examples = [tokenize_example(r, tokenizer, d) for r in rows]
    kept = [e for e in examples if e["trainable"]]
    truncated = sum(e["truncated"] for e in examples)
    turns_cut = sum(e["turns_cut"] for e in examples)
    shortened = sum(e["shortened"] for e in examples)
    dropped = len(examples) - len(kept)
    if not kept:
        raise ConfigError(
            f"Every {split} example's prompt is longer than dataset.max_seq_length={d.max_seq_length}; "
            f"raise dataset.max_seq_length."
        )
    if truncated:
        log.warning(
            "%s: %d of %d examples truncated to dataset.max_seq_length=%d: %d answers cut short at the "
            "limit, %d later assistant turns left out, %d examples dropped (nothing of their first answer "
            "was left)",
            split,
            truncated,
            len(examples),
            d.max_seq_length,
            shortened,
            turns_cut,
            dropped,
        )
    stats = {
        f"data/{split}_examples": len(kept),
        f"data/{split}_truncated": truncated,
        f"data/{split}_shortened": shortened,
        f"data/{split}_turns_cut": turns_cut,
        f"data/{split}_dropped": dropped,
        f"data/{split}_tokens": sum(len(e["input_ids"]) for e in kept),
    }
    ds = Dataset.from_list([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in kept])
    if d.pack:
        ds = pack_examples(ds, d.max_seq_length)
        stats[f"data/{split}_rows"] = len(ds)
        stats[f"data/{split}_row_fill"] = stats[f"data/{split}_tokens"] / (len(ds) * d.max_seq_length)
    return ds, stats


PACK_WINDOW = 64  # open rows an example may join: bounds packing time, keeps rows close to the data order


def pack_examples(ds: Dataset, max_len: int) -> Dataset:
    """Packing that keeps examples apart: whole examples fill rows of up to `max_len` tokens, each joining the
    first of the last PACK_WINDOW rows with room for it (first fit: rows come out ~97% full on Alpaca lengths,
    against ~88% when a row is closed at the first example that does not fit). Each row keeps its examples'
    lengths, so that the collator can restart position ids and attention at every boundary. Written by hand:
    transformers' DataCollatorWithFlattening flattens a batch of examples, but has no notion of fixed-size
    rows to batch by."""
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
    """A batch of packed rows -> one [1, tokens] sequence with position ids restarting at every example and no
    padding between examples (transformers' DataCollatorWithFlattening, fed the rows' examples). The first
    label of each example is -100, so no token is predicted across a boundary. Two ways to keep the examples
    apart:

    - `varlen=True`: the boundaries also travel as FlashAttention's cu_seq_lens/max_length, which the varlen
      kernel reads (qlora_lab/attention.py); every token of the batch is a real one.
    - `varlen=False`: the attention implementation turns the restarts into a block-diagonal mask. The sequence
    is
      then extended to a multiple of ALIGN tokens: SDPA's fused kernels need an aligned mask, and an unaligned
      length fell back to the unfused kernel (measured on 8B shapes: 0.99 s steps instead of 0.69 s). The
      extension continues the last example with `pad_id` tokens, labelled -100: causal attention keeps them
      out of every real token's view, so no real loss changes, and the Trainer's non-padding count leaves them
      out.

    `static=(tokens, examples, max_len)` (varlen only, for train.cuda_graphs): every batch gets the same
    shape, `tokens` tokens and `examples` boundaries, which a CUDA graph needs. The missing tokens become
    padding examples of at most `max_len` pad tokens (labelled -100, so no loss changes; not counted as
    tokens seen: the batch says how many in PADDING_KEY), the missing boundaries empty examples at the end,
    and max_length_q/k is `max_len`."""

    ALIGN = 64
    PADDING_KEY = "qlora_lab_padding_tokens"

    def __init__(self, pad_id: int, varlen: bool = False, static: tuple[int, int, int] | None = None):
        from transformers import DataCollatorWithFlattening

        self.pad_id, self.varlen, self.static = pad_id, varlen, static if varlen else None
        self.flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=varlen
        )

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        examples = []
        for row in rows:
            start = 0
            for n in row["lengths"]:
                examples.append(
                    {
                        "input_ids": row["input_ids"][start : start + n],
                        "labels": row["labels"][start : start + n],
                    }
                )
                start += n
        batch = self.flatten(examples)
        if self.static:
            return self.pad_to_static(batch)
        extra = -batch["input_ids"].shape[1] % self.ALIGN
        if extra and not self.varlen:
            last = batch["position_ids"][0, -1].item()
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, extra), self.pad_id)], 1)
            batch["labels"] = torch.cat([batch["labels"], torch.full((1, extra), IGNORE_INDEX)], 1)
            batch["position_ids"] = torch.cat(
                [batch["position_ids"], last + 1 + torch.arange(extra)[None]], 1
            )
        return batch

    def pad_to_static(self, batch: dict) -> dict:
        import torch

        tokens, examples, max_len = self.static
        extra = tokens - batch["input_ids"].shape[1]
        pads = [max_len] * (extra // max_len) + ([extra % max_len] if extra % max_len else [])
        cu = batch["cu_seq_lens_q"].tolist()
        if extra < 0 or len(cu) - 1 + len(pads) > examples:  # never for the rows it was sized for
            return batch
        ends = list(itertools.accumulate(pads, initial=cu[-1]))[1:]
        cu = torch.tensor(cu + ends + [tokens] * (examples + 1 - len(cu) - len(ends)), dtype=torch.int32)
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, extra), self.pad_id)], 1)
        batch["labels"] = torch.cat([batch["labels"], torch.full((1, extra), IGNORE_INDEX)], 1)
        batch["position_ids"] = torch.cat([batch["position_ids"], *(torch.arange(n)[None] for n in pads)], 1)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = max_len
        batch[self.PADDING_KEY] = extra
        return batch


def mean_context(ds: Dataset) -> float:
    """Mean number of tokens each token attends to (itself and those before it in its example): the attention
    term of the FLOPs per token. Packed rows count per example, since attention stops at each boundary."""
    lengths = (
        [n for row in ds["lengths"] for n in row]
        if "lengths" in ds.column_names
        else [len(ids) for ids in ds["input_ids"]]
    )
    return sum(n * (n + 1) / 2 for n in lengths) / max(sum(lengths), 1)
