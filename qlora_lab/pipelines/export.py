"""Export: a trained run -> a GGUF file for llama.cpp / Ollama, or a dynamic-int8 model for CPUs, with its
costs.

    python -m qlora_lab pipeline=export run_dir=RUN export.format=gguf|int8_dynamic
        [export.gguf_type=f16|q8_0|q4_0]

Reads top to bottom: check everything a user can get wrong, merge the adapter if the run has no merged/ yet
(with the run's merge.base choice), write each export, then load each one back on the CPU and measure it, with
the trained model and the base before fine-tuning, against the unquantized merged model:
  cost       file size, load time, generated tokens/s, peak RSS (each export is measured in a fresh process)
  quality    eval perplexity (response tokens, as the training loss), and learnt_kept: the share of the
             eval-loss gain from the base to the trained model that the export keeps (a warning below
             LEARNT_KEPT_WARNING)
  agreement  greedy exact-match rate of the outputs with merged's, max |logit difference| and mean
             KL(merged || export) of next-token distributions over every position of
             inference.agreement_examples eval examples, and the same against the trained model (the adapter
             on the base quantized as in training: trained_exact_match, trained_mean_kl); for GGUF also
             whether its embedded tokenizer gives the same ids as the run's
Writes RUN/export/<files>, RUN/export/export_report.json (one entry per export, kept across jobs) and a table
(export.md in the job dir, also printed; also into export.table_dir when set).

GGUF files are read back with transformers, which dequantizes them to fp32: their load time and speed are
those of that path, not of llama.cpp (their file size is what llama.cpp and Ollama load).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from ..config import Config, InferenceMode, QuantMethod, register
from ..data import encode, load_splits, tokenize_example
from ..exports import EXPORTS, ExportSpec, export_targets
from ..inference import adapter_dir, agreement, eval_prompts, load_for_inference, measure_generation
from ..layout import RunLayout
from ..models import EMBEDDED_PREFIX, SOURCE_FILE, load_tokenizer, model_path, tokenizer_path
from ..report import markdown_table
from ..rundir import Run, hardware, peak_memory_gib, read_json, refuse_existing
from . import merge

log = logging.getLogger(__name__)

COLUMNS = [
    "export",
    "size_mib",
    "export_s",
    "load_s",
    "tokens_per_s",
    "peak_rss_gib",
    "eval_perplexity",
    "learnt_kept",
    "exact_match",
    "mean_kl",
    "max_abs_logit_diff",
    "trained_exact_match",
    "trained_mean_kl",
]
# An export that keeps less than this share of what fine-tuning taught (learnt_kept) is warned about.
LEARNT_KEPT_WARNING = 0.9


# ---------------------------------------------------------------- what to write, and where


def targets(cfg: Config) -> list[tuple[ExportSpec, str | None]]:
    """[(format, variant or None)], e.g. [(gguf, "q8_0"), (int8_dynamic, None)] (qlora_lab/exports)."""
    return export_targets(cfg.export)


def model_config(cfg: Config, source: Path) -> dict:
    """The config.json of what will be exported: merged/ if it exists, else the base the run was trained
    on."""
    merged = RunLayout(source).merged_config
    if merged.is_file():
        return json.loads(merged.read_text())
    return AutoConfig.from_pretrained(
        model_path(cfg), trust_remote_code=cfg.model.trust_remote_code
    ).to_dict()


def check(cfg: Config, source: Path, todo: list[tuple[ExportSpec, str | None]]) -> None:
    """Everything a user can get wrong, before any merge, load or write."""
    adapter = adapter_dir(source)  # a finished training run
    for spec in dict.fromkeys(spec for spec, _ in todo):
        if spec.check:
            spec.check(cfg, source, model_config(cfg, source), adapter)
    refuse_existing(
        [spec.path(source, variant) for spec, variant in todo],
        "remove it or pass export.overwrite=true to replace it.",
        cfg.export.overwrite,
    )


def model_card_license(folder: Path | None) -> str | None:
    """The license in a model card's front matter (README.md), if the folder has one."""
    if folder is None or not (folder / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data.to_dict().get("license")


def provenance(cfg: Config, source: Path) -> dict:
    """What a GGUF export records about itself (general.* keys): the base model it is a fine-tune of, the
    base's license, how it was fine-tuned. From the embedded GGUF's own keys, a hub id, or a local folder's
    model card."""
    name = cfg.model.name_or_path
    base: dict = {"name": name}
    license_ = None
    folder = Path(model_path(cfg))
    if (folder / SOURCE_FILE).is_file():  # an embedded GGUF, converted: its own general.* keys
        general = json.loads((folder / SOURCE_FILE).read_text())["general"]
        base = {"name": name.removeprefix(EMBEDDED_PREFIX), "organization": general.get("organization")}
        if base["organization"]:
            base["repo_url"] = f"https://huggingface.co/{base['organization']}/{base['name']}"
        license_ = general.get("license")
    elif folder.is_dir():  # a local folder or a random-weight build
        base["name"] = folder.name
        license_ = model_card_license(folder)
    elif "/" in name:  # a hub id
        from huggingface_hub import try_to_load_from_cache

        base |= {"organization": name.split("/")[0], "repo_url": f"https://huggingface.co/{name}"}
        card = try_to_load_from_cache(name, "README.md")
        license_ = model_card_license(Path(card).parent) if isinstance(card, str) else None
    method = (
        "lora" if cfg.quantization.method is QuantMethod.none else f"qlora-{cfg.quantization.method.value}"
    )
    report = RunLayout(source).merge_report
    merge_base = json.loads(report.read_text()).get("merge/base", "?") if report.is_file() else "?"
    return {
        "base_model": base,
        "license": license_,
        "finetune": method,
        "tags": ["fine-tune", method],
        "description": f"{method} fine-tune of {name} (run {source.name}), adapter merged into the "
        f"{merge_base} base weights, written by qlora_lab",
    }


# ---------------------------------------------------------------- writing


def write_export(
    merged: Path, spec: ExportSpec, variant: str | None, target: Path, name: str, about: dict
) -> dict:
    """Write into a temporary path, then swap it in: a half-written export never looks finished."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    info = spec.write(merged, tmp, variant, name, about)
    info["export_s"] = time.perf_counter() - t0
    if target.is_dir():  # only reached with export.overwrite=true
        shutil.rmtree(target)
    target.unlink(missing_ok=True)
    tmp.rename(target)
    return info


def size_mib(path: Path) -> float:
    files = (
        [path]
        if path.is_file()
        else [p for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".gguf")]
    )
    return sum(p.stat().st_size for p in files) / 2**20


# ---------------------------------------------------------------- measuring


def export_spec(name: str) -> ExportSpec:
    """The format of an export named as ExportSpec.name writes it (gguf-q8_0, int8_dynamic)."""
    return next(
        s for s in EXPORTS.values() if name == s.format.value or name.startswith(f"{s.format.value}-")
    )


def load_export(name: str, path: Path, cfg: Config):
    """(model in eval mode, tokenizer) for the trained model (the adapter on the base quantized as in
    training), the base before fine-tuning (fp32), merged/ (fp32), or an export (`name` as ExportSpec.name);
    all but the trained model on the CPU."""
    if name == "trained":
        return load_for_inference(cfg, path, InferenceMode.adapter)
    if name == "base":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code)
    elif name == "merged":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = load_tokenizer(str(path), cfg.model.trust_remote_code)
    else:
        model, tokenizer = export_spec(name).load(path, cfg)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def measure(
    name: str, path: Path, cfg: Config, prompts: list[str], examples: list[dict], source_tokenizer
) -> tuple[dict, list[str], list[torch.Tensor]]:
    """One export's costs: (row, greedy outputs, fp32 logits of the first agreement examples)."""
    register()  # in a spawned process: the config's interpolations (paths) need their resolvers
    gen = OmegaConf.merge(cfg.generation, {"do_sample": False})  # exact match needs deterministic decoding
    batch = cfg.inference.batch_size
    runtime_gib = peak_memory_gib()  # the fresh process before loading: Python, torch, transformers
    t0 = time.perf_counter()
    model, tokenizer = load_export(name, path, cfg)
    load_s = time.perf_counter() - t0
    # the same token ids (the run's tokenizer's) for every export, so that the logits line up position by
    # position
    stats, outputs, logits = measure_generation(
        model,
        tokenizer,
        prompts,
        gen,
        batch,
        examples,
        source_tokenizer.pad_token_id,
        cfg.inference.agreement_examples,
    )
    row = {
        "export": name,
        "size_mib": None if name == "trained" else size_mib(path),
        "load_s": load_s,
        "tokens_per_s": stats["tokens_per_s"],
        "peak_rss_gib": peak_memory_gib(),
        "runtime_rss_gib": runtime_gib,
        "eval_perplexity": stats["eval_perplexity"],
        "new_tokens": stats["new_tokens"],
    }
    if name not in ("trained", "base", "merged") and export_spec(name).own_tokenizer:  # against the run's
        same = [
            encode(p, tokenizer)["input_ids"] == encode(p, source_tokenizer)["input_ids"] for p in prompts
        ]
        row["tokenizer_match"] = sum(same) / len(same)
        row["chat_template_match"] = tokenizer.chat_template == source_tokenizer.chat_template
    return row, outputs, logits


def measure_in_fresh_process(*args):
    """measure() in a new Python process: its peak RSS is that export's alone (a process that loaded an
    earlier model keeps the freed memory, so its peak would carry over), and nothing is warm from an earlier
    row."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


# ---------------------------------------------------------------- report


def compared(reference: dict, other: dict) -> dict:
    """Greedy exact-match rate, mean KL(reference || other) and max |logit difference| of one model against
    another."""
    max_diff, kl = agreement(reference["logits"], other["logits"])
    pairs = list(zip(reference["outputs"], other["outputs"], strict=True))
    return {
        "exact_match": sum(a == b for a, b in pairs) / len(pairs),
        "mean_kl": kl,
        "max_abs_logit_diff": max_diff,
    }


def learnt_kept(base_ppl: float, trained_ppl: float, ppl: float) -> float | None:
    """The share of fine-tuning's eval-loss gain (log perplexity, base -> trained) a model keeps: 1 = all of
    it, 0 = back to the base. None when fine-tuning gained (almost) nothing to keep."""
    gain = math.log(base_ppl) - math.log(trained_ppl)
    return (math.log(base_ppl) - math.log(ppl)) / gain if gain > 1e-3 else None


def markdown(rows: list[dict], header: str) -> str:
    return markdown_table(rows, COLUMNS, header)


def run(cfg: Config, run: Run) -> list[dict]:
    source = run.source
    todo = targets(cfg)
    check(cfg, source, todo)

    # ---- the merged model everything is exported from (merge.base as configured)
    merged = RunLayout(source).merged
    if not RunLayout(source).merged_config.is_file():
        print(
            f"{source} has no merged/ yet: merging the adapter first (merge.base={cfg.merge.base.value})",
            flush=True,
        )
        merge.run(cfg, run)

    # ---- write
    folder = RunLayout(source).export
    folder.mkdir(exist_ok=True)
    written = {}
    about = provenance(cfg, source)
    for spec, variant in todo:
        name, path = spec.name(variant), spec.path(source, variant)
        written[name] = (
            path,
            write_export(merged, spec, variant, path, f"{cfg.model.name_or_path} ({source.name})", about),
        )
        print(
            f"{name}: wrote {path} ({size_mib(path):.1f} MiB, {written[name][1]['export_s']:.1f} s)",
            flush=True,
        )
    if not cfg.export.measure:
        return []

    # ---- measure each export against merged/, on the same prompts and eval examples
    source_tokenizer = load_tokenizer(str(merged), cfg.model.trust_remote_code)
    items = eval_prompts(cfg, source_tokenizer, cfg.inference.num_prompts)
    prompts = [it["prompt"] for it in items]
    examples = [tokenize_example(row, source_tokenizer, cfg.dataset) for row in load_splits(cfg).eval]
    examples = [e for e in examples if e["trainable"]]
    threads = torch.get_num_threads()
    # the trained model (adapter on the quantized base) and the base before fine-tuning first: the exports are
    # compared with the trained model, and how much of the fine-tuning's eval-loss gain each keeps is measured
    # between the two
    measured = {
        "trained": (source, {}),
        "base": (Path(model_path(cfg)), {}),
        "merged": (merged, {}),
        **written,
    }
    rows, results = [], {}
    for name, (path, info) in measured.items():
        print(f"measuring {name} ...", flush=True)
        row, outputs, logits = measure_in_fresh_process(name, path, cfg, prompts, examples, source_tokenizer)
        results[name] = {"outputs": outputs, "logits": logits}
        rows.append(row | info | {"outputs": outputs})
    for row in rows:
        row |= compared(results["merged"], results[row["export"]])
        row |= {f"trained_{k}": v for k, v in compared(results["trained"], results[row["export"]]).items()}
        row["learnt_kept"] = learnt_kept(
            rows[1]["eval_perplexity"], rows[0]["eval_perplexity"], row["eval_perplexity"]
        )
    reference = results["merged"]
    for row in rows[2:]:
        if row["learnt_kept"] is not None and row["learnt_kept"] < LEARNT_KEPT_WARNING:
            print(
                f"warning: {row['export']} keeps {row['learnt_kept']:.0%} of what fine-tuning taught (of the "
                f"eval loss gain from the base to the trained model), less than {LEARNT_KEPT_WARNING:.0%}; "
                f"{row['trained_exact_match']:.0%} of its greedy answers equal the trained model's.",
                file=sys.stderr,
                flush=True,
            )

    # ---- write the report
    report_path = RunLayout(source).export_report
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report |= {
        r["export"]: r | ({"file": str(written[r["export"]][0])} if r["export"] in written else {})
        for r in rows
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    merge_report = read_json(RunLayout(source).merge_report)
    runtime = min(r["runtime_rss_gib"] for r in rows)
    header = (
        f"Exports of {source.name}: model {cfg.model.name_or_path}, merged into the "
        f"{merge_report.get('merge/base', '?')} base; CPU ({hardware().get('cpu_count')} cores, {threads} "
        "torch "
        f"threads); {len(prompts)} eval prompts, greedy, max_new_tokens {cfg.generation.max_new_tokens}, "
        f"batch {cfg.inference.batch_size}; peak RSS of a fresh process per export, {runtime:.2f} GiB of it "
        "before loading (the runtime); agreement with merged (fp32) and with the trained model (trained_*: "
        "the adapter on the "
        f"{'unquantized' if cfg.quantization.method is QuantMethod.none else cfg.quantization.method.value} "
        f"base) over {sum(len(x) for x in reference['logits'])} positions of {len(reference['logits'])} eval "
        f"examples; perplexity over {len(examples)} eval examples; learnt_kept: the share of the eval-loss "
        f"gain from base to trained that a model keeps (warned below {LEARNT_KEPT_WARNING:.0%}). GGUF rows: "
        "read back and run by transformers (dequantized to fp32)."
    )
    table = markdown(rows, header)
    RunLayout(run.dir).export_md.write_text(table)
    if cfg.export.table_dir:
        out = Path(cfg.export.table_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "export.md").write_text(table)
        (out / "export_report.json").write_text(json.dumps({r["export"]: r for r in rows}, indent=2) + "\n")
    run.log(
        {
            f"export/{r['export']}/{k}": v
            for r in rows
            for k, v in r.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    print("\n" + table, flush=True)
    return rows
