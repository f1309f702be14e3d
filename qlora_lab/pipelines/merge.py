"""Merge: base (unquantized) + trained LoRA adapter -> <run>/merged/, a plain Hugging Face model.

The result loads with `AutoModelForCausalLM.from_pretrained(merged)` without peft. Reads top to bottom:
check, load the base, (optionally) swap in the quantize->dequantize weights, merge, save, report.

merge.base=original merges into the full-precision base; merge.base=dequantized first replaces every weight
that training saw quantized by dequantize(quantize(W)), so the merged model computes what the QLoRA adapter
was trained against. merge.base=auto (the default) takes the weights training saw: dequantized for a quantized
run, original otherwise (the adapter merged into the original weights of a QLoRA run is another model: PEFT
issue 2321). The report gives the size of that difference next to the size of the LoRA update itself, and how
closely the merged model, as written, agrees with the model as trained (the adapter on the base quantized as
in training).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from ..config import Config, InferenceMode, MergeBase, QuantMethod
from ..data import load_splits, tokenize_example
from ..inference import (
    adapter_dir,
    agreement,
    eval_prompts,
    generate,
    load_for_inference,
    resize_embeddings,
    teacher_forced,
)
from ..layout import RunLayout
from ..models import device, load_model, load_tokenizer, model_path, resolve_dtype
from ..rundir import Run, refuse_existing

log = logging.getLogger(__name__)


def quantization_round_trip(model, cfg: Config, replace: bool) -> dict:
    """Compare every weight bitsandbytes quantizes with dequantize(quantize(W)), loaded exactly as training
    did.

    With `replace`, the base's weights are swapped for the round-tripped ones (merge.base=dequantized).
    Layer by layer, so memory stays at one full-precision model plus one quantized model.
    """
    from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type

    quantized = load_model(model_path(cfg), cfg)
    modules = dict(model.named_modules())
    max_abs, err_sq, norm_sq, layers = 0.0, 0.0, 0.0, 0
    for name, qmodule in quantized.named_modules():
        qweight = getattr(qmodule, "weight", None)
        if qweight is None or not get_bnb_param_type(qweight):
            continue
        weight = modules[name].weight
        round_trip = dequantize_bnb_weight(qweight, getattr(qmodule, "state", None)).to(
            weight.device, torch.float32
        )
        diff = weight.detach().float() - round_trip
        max_abs = max(max_abs, diff.abs().max().item())
        err_sq += diff.pow(2).sum().item()
        norm_sq += weight.detach().float().pow(2).sum().item()
        layers += 1
        if replace:
            with torch.no_grad():
                weight.copy_(round_trip.to(weight.dtype))
    del quantized
    return {
        "merge/quantized_layers": layers,
        "merge/base_diff_max_abs": max_abs,
        "merge/base_diff_rel": (err_sq / norm_sq) ** 0.5 if norm_sq else 0.0,
    }


def lora_update_size(peft_model) -> dict:
    """The size of the LoRA update B@A*scale summed over every adapted layer, relative to the base weights."""
    max_abs, delta_sq, norm_sq = 0.0, 0.0, 0.0
    for module in peft_model.modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            delta = module.get_delta_weight("default").detach().float()
            max_abs = max(max_abs, delta.abs().max().item())
            delta_sq += delta.pow(2).sum().item()
            norm_sq += module.get_base_layer().weight.detach().float().pow(2).sum().item()
    return {
        "merge/lora_delta_max_abs": max_abs,
        "merge/lora_delta_rel": (delta_sq / norm_sq) ** 0.5 if norm_sq else 0.0,
    }


def chosen_base(cfg: Config) -> MergeBase:
    """merge.base, with auto resolved to the weights the adapter was trained against."""
    if cfg.merge.base is MergeBase.auto:
        return MergeBase.original if cfg.quantization.method is QuantMethod.none else MergeBase.dequantized
    return cfg.merge.base


def outputs_and_logits(model, tokenizer, cfg: Config, prompts: list[str], examples: list[dict]):
    gen = OmegaConf.merge(cfg.generation, {"do_sample": False})  # exact match needs deterministic decoding
    outputs = [r["output"] for r in generate(model, tokenizer, prompts, gen, cfg.inference.batch_size)]
    _, logits = teacher_forced(
        model, examples, cfg.inference.batch_size, tokenizer.pad_token_id, cfg.inference.agreement_examples
    )
    return outputs, logits


def agreement_with_trained(cfg: Config, source: Path, merged: Path) -> dict:
    """The merged model as written (unquantized) against the model as trained (the adapter on the base
    quantized as in training): greedy exact match over inference.num_prompts eval prompts, mean KL(trained ||
    merged) and max
    |logit difference| over every position of inference.agreement_examples eval examples."""
    trained, tokenizer = load_for_inference(cfg, source, InferenceMode.adapter)
    prompts = [p["prompt"] for p in eval_prompts(cfg, tokenizer, cfg.inference.num_prompts)]
    examples = [
        e
        for e in (tokenize_example(r, tokenizer, cfg.dataset) for r in load_splits(cfg).eval)
        if e["trainable"]
    ]
    with torch.no_grad():
        reference, reference_logits = outputs_and_logits(trained, tokenizer, cfg, prompts, examples)
        del trained
        model = (
            AutoModelForCausalLM.from_pretrained(merged, dtype=resolve_dtype(cfg.model.dtype))
            .to(device())
            .eval()
        )
        outputs, logits = outputs_and_logits(model, tokenizer, cfg, prompts, examples)
    max_diff, kl = agreement(reference_logits, logits)
    return {
        "merge/trained_exact_match": sum(a == b for a, b in zip(reference, outputs, strict=True))
        / len(prompts),
        "merge/trained_mean_kl": kl,
        "merge/trained_max_abs_logit_diff": max_diff,
        "merge/trained_prompts": len(prompts),
    }


def run(cfg: Config, run: Run) -> Path:
    from peft import PeftModel

    m = cfg.merge
    base_choice, quant = chosen_base(cfg), cfg.quantization.method
    adapter = adapter_dir(run.source)
    target = RunLayout(run.source).merged
    refuse_existing([target], "remove it or pass merge.overwrite=true to replace it.", m.overwrite)

    if m.base is MergeBase.auto and quant is not QuantMethod.none:
        print(
            f"merge.base=auto: this run trained on {quant.value} weights, so the adapter is merged into "
            "dequantize(quantize(W)), the weights it was trained against (merge.base=original merges into "
            "the full-precision weights instead: another model)",
            flush=True,
        )
    # ---- base, unquantized (merging into 4-bit weights would round the result to 4 bits)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(str(adapter), cfg.model.trust_remote_code)
    model = load_model(model_path(cfg), cfg, quantize=False)
    report = {"merge/base": base_choice.value, "merge/quantization": quant.value}
    if quant is not QuantMethod.none:
        report |= quantization_round_trip(model, cfg, replace=base_choice is MergeBase.dequantized)
    resize_embeddings(model, tokenizer)

    # ---- merge
    model = PeftModel.from_pretrained(model, adapter)
    report |= lora_update_size(model)
    model = model.merge_and_unload()
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # ---- save into a temporary folder, then swap it in: a half-written merge never looks finished
    tmp = RunLayout(run.source).merged_tmp
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=m.max_shard_size)  # also writes generation_config.json
    tokenizer.save_pretrained(tmp)
    report["merge/time_s"] = time.perf_counter() - t0
    del model
    report |= agreement_with_trained(cfg, run.source, tmp)
    (tmp / RunLayout(run.source).merge_report.name).write_text(
        json.dumps(report, indent=2) + "\n"
    )  # tmp: merged/
    if target.exists():  # only reached with merge.overwrite=true (or an empty folder)
        shutil.rmtree(target)
    tmp.rename(target)

    run.log({k: v for k, v in report.items() if not isinstance(v, str)})
    line = f"merged {adapter} into the {base_choice.value} base -> {target} ({report['merge/time_s']:.1f} s)"
    if "merge/base_diff_rel" in report:
        line += (
            f"\nweight difference original vs dequantized base ({quant.value}): max |dW| "
            f"{report['merge/base_diff_max_abs']:.3g}, relative {report['merge/base_diff_rel']:.3%}; "
            f"LoRA update: max {report['merge/lora_delta_max_abs']:.3g}, relative "
            f"{report['merge/lora_delta_rel']:.3%}"
        )
    trained_on = "unquantized" if quant is QuantMethod.none else quant.value
    line += (
        f"\nagreement with the model as trained (adapter on the {trained_on} base): "
        f"{report['merge/trained_exact_match']:.0%} of {report['merge/trained_prompts']} greedy answers "
        f"identical, mean KL {report['merge/trained_mean_kl']:.3g}"
    )
    print(line, flush=True)
    if (
        report["merge/trained_exact_match"] < 1
        and base_choice is MergeBase.original
        and quant is not QuantMethod.none
    ):
        print(
            "warning: merged into the original weights, the model differs from the one trained on "
            f"{quant.value} weights; merge.base=dequantized (the default, auto) merges into the weights it "
            "was trained against.",
            file=sys.stderr,
            flush=True,
        )
    return target
