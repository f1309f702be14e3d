"""Merge, the inference modes, the comparison and chat, on the tiny random model."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_lab.config import ConfigError
from qlora_lab.data import render_prompt
from qlora_lab.inference import eval_prompts, generate, load_for_inference
from qlora_lab.pipelines import compare, infer, merge
from qlora_lab.rundir import Run

from .conftest import TINY, assert_one_sentence_error, copy_run, make_cfg, run_main

FAST_GEN = ["generation.max_new_tokens=6", "inference.num_prompts=3", "inference.batch_size=2"]


@pytest.fixture(scope="module")
def fp32_run(lora_run, tmp_path_factory):
    """A copy of the session's LoRA run on an unquantized fp32 base, merged in-process."""
    _, trained = lora_run
    run_dir = copy_run(trained, tmp_path_factory, "fp32_run")
    cfg = make_cfg([*TINY, "quantization=none", "train.eval_before=false", "merge.max_shard_size=5MB"])
    merge.run(
        cfg, Run(dir=tmp_path_factory.mktemp("fp32_merge"), source=run_dir)
    )  # merged/ goes into run_dir
    return cfg, run_dir


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """A QLoRA nf4 run trained and merged (merge.base=auto: into the dequantized base) by one CLI command:
    merge follows train."""
    run_dir = tmp_path_factory.mktemp("nf4") / "run"
    result = run_main(
        *TINY,
        "quantization=nf4",
        "train.eval_before=false",
        "pipeline.stages=[train,merge]",
        *FAST_GEN,
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merge.base=auto: this run trained on nf4 weights" in result.stdout
    return make_cfg([*TINY, "quantization=nf4"]), run_dir


def eval_ids(cfg, tokenizer):
    return tokenizer(eval_prompts(cfg, tokenizer, 1)[0]["prompt"], return_tensors="pt")["input_ids"]


# ---------------------------------------------------------------- merge


def test_merged_model_equals_adapter_model_on_fp32_base(fp32_run):
    cfg, run_dir = fp32_run
    merged = run_dir / "merged"
    # a plain Hugging Face folder: sharded safetensors, tokenizer, generation config, no quantization, no peft
    assert (merged / "model.safetensors.index.json").is_file() and len(list(merged.glob("*.safetensors"))) > 1
    assert (merged / "tokenizer_config.json").is_file() and (merged / "generation_config.json").is_file()
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["merge/base"] == "original" and report["merge/lora_delta_rel"] > 0

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    adapter_model, tokenizer = load_for_inference(cfg, run_dir, "adapter")
    in_memory, _ = load_for_inference(cfg, run_dir, "merge_and_unload")
    base, _ = load_for_inference(cfg, run_dir, "base")
    ids = eval_ids(cfg, tokenizer)
    with torch.no_grad():
        reference = adapter_model(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(in_memory(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
        assert (base(input_ids=ids).logits - reference).abs().max() > 1e-3  # the adapter changed the model


def test_batched_left_padded_generation_equals_one_at_a_time(fp32_run):
    cfg, run_dir = fp32_run
    model, tokenizer = load_for_inference(cfg, run_dir, "merged")
    prompts = [p["prompt"] for p in eval_prompts(cfg, tokenizer, 3)]
    assert (
        len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1
    )  # different lengths: padding is exercised
    gen = make_cfg(["generation.max_new_tokens=5"]).generation
    batched = generate(model, tokenizer, prompts, gen, batch_size=3)
    single = [generate(model, tokenizer, [p], gen, batch_size=1)[0] for p in prompts]
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert all(1 <= r["new_tokens"] <= 5 and r["latency_s"] >= r["ttft_s"] > 0 for r in batched)
    assert len({r["latency_s"] for r in batched}) == 1  # the batch's latency, shared by its prompts


def test_existing_merge_is_never_overwritten_silently(fp32_run, tmp_path):
    cfg, run_dir = fp32_run
    report = (run_dir / "merged" / "merge_report.json").read_text()
    result = run_main(*TINY, "pipeline=merge", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'job'}")
    assert_one_sentence_error(result, str(run_dir / "merged"), "merge.overwrite=true")
    assert (run_dir / "merged" / "merge_report.json").read_text() == report

    # merge.overwrite=true replaces it
    again = make_cfg([*TINY, "quantization=none", "merge.overwrite=true", "merge.max_shard_size=5MB"])
    merge.run(again, Run(dir=tmp_path, source=run_dir))
    assert (
        json.loads((run_dir / "merged" / "merge_report.json").read_text())["merge/time_s"]
        != json.loads(report)["merge/time_s"]
    )
    assert not (run_dir / "merged.tmp").exists()


def test_dequantized_merge_reloaded_in_nf4_equals_in_memory_merge(nf4_run):
    """merge.base=dequantized writes Q(W) + BA; quantizing that on load is what PEFT's in-memory merge into
    the 4-bit base does, so the two give the same model. The unmerged adapter computes Q(W) + BA unrounded."""
    cfg, run_dir = nf4_run
    report = json.loads((run_dir / "merged" / "merge_report.json").read_text())
    assert report["merge/base"] == "dequantized" and report["merge/quantized_layers"] == 14
    assert 0 < report["merge/base_diff_rel"] < 0.5
    merged, tokenizer = load_for_inference(cfg, run_dir, "merged")
    in_memory, _ = load_for_inference(cfg, run_dir, "merge_and_unload")
    adapter_model, _ = load_for_inference(cfg, run_dir, "adapter")
    ids = eval_ids(cfg, tokenizer)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (merged, in_memory, adapter_model))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 0  # re-quantizing the merged weights rounds the LoRA update


def test_merge_reports_agreement_with_the_trained_model_for_both_bases(nf4_run, tmp_path, capfd):
    """The default (dequantized) merge computes what was trained; merged into the original weights it is
    further from it, and the merge says so."""
    cfg, run_dir = nf4_run
    dequantized = json.loads((run_dir / "merged" / "merge_report.json").read_text())
    source = tmp_path / "run"
    shutil.copytree(run_dir, source, ignore=shutil.ignore_patterns("merged"))
    merge.run(
        make_cfg([*TINY, "quantization=nf4", "merge.base=original", *FAST_GEN]),
        Run(dir=tmp_path, source=source),
    )
    original = json.loads((source / "merged" / "merge_report.json").read_text())
    assert original["merge/base"] == "original" and dequantized["merge/trained_prompts"] == 3
    assert dequantized["merge/trained_exact_match"] == 1.0 and dequantized["merge/trained_mean_kl"] < 1e-6
    assert original["merge/trained_mean_kl"] > 100 * dequantized["merge/trained_mean_kl"]
    assert original["merge/trained_max_abs_logit_diff"] > dequantized["merge/trained_max_abs_logit_diff"]
    printed = capfd.readouterr()
    assert "agreement with the model as trained (adapter on the nf4 base)" in printed.out
    if original["merge/trained_exact_match"] < 1:
        assert "merge.base=dequantized (the default, auto)" in printed.err


# ---------------------------------------------------------------- infer and compare


@pytest.mark.parametrize("mode", ["merged", "adapter", "merge_and_unload"])
def test_every_mode_generates_on_tiny_random(nf4_run, tmp_path, mode):
    cfg, run_dir = nf4_run
    cfg = make_cfg([*TINY, "quantization=nf4", f"inference={mode}", *FAST_GEN])
    run = Run(dir=tmp_path, source=run_dir)
    infer.run(cfg, run)
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["mode"] for r in rows} == {mode}
    for r in rows:
        assert r["prompt"].startswith("<|im_start|>") and r["reference"]  # eval split, chat-formatted
        assert 1 <= r["new_tokens"] <= 6 and r["latency_s"] > 0 and isinstance(r["output"], str)
    assert run.metrics["infer/new_tokens"] == sum(r["new_tokens"] for r in rows)


def test_infer_cli_with_prompts_file_and_sampling(nf4_run, tmp_path):
    _, run_dir = nf4_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a fruit."}\n{"instruction": "Add 2 and 3."}\n')
    job = tmp_path / "job"
    result = run_main(
        *TINY,
        "pipeline=infer",
        f"run_dir={run_dir}",
        "inference=merge_and_unload",
        "generation=sampling",
        f"inference.prompts_file={prompts}",
        "inference.before_after=true",
        f"hydra.run.dir={job}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (job / "generations.jsonl").read_text().splitlines()]
    assert [r["message"] for r in rows] == ["Name a fruit.", "Add 2 and 3."]
    assert all(r["new_tokens"] <= 20 and "base_output" in r for r in rows)  # sampling.yaml: max_new_tokens=20
    assert "[base]" in result.stdout and "[merge_and_unload]" in result.stdout
    # the continued run's groups were inherited: the job's saved config names the tiny model and nf4
    saved = (job / ".hydra" / "config.yaml").read_text()
    assert "tiny-random-llama" in saved and "nf4" in saved


def test_prompts_file_mistakes_name_the_line(nf4_run, tmp_path):
    cfg, run_dir = nf4_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt field"}\n')
    cfg = make_cfg([*TINY, "quantization=nf4", f"inference.prompts_file={bad}"])
    with pytest.raises(ConfigError, match="line 2 has neither a `prompt`"):
        infer.run(cfg, Run(dir=tmp_path, source=run_dir))


def test_compare_writes_the_table(nf4_run, tmp_path, capsys):
    _, run_dir = nf4_run
    job = tmp_path
    cfg = make_cfg(
        [
            *TINY,
            "quantization=nf4",
            "inference.modes=[merged,adapter,base]",
            "inference.agreement_examples=2",
            *FAST_GEN,
        ]
    )
    compare.run(cfg, Run(dir=job, source=run_dir))
    rows = {r["mode"]: r for r in csv.DictReader((job / "comparison.csv").open())}
    assert list(rows) == ["adapter", "merged", "base"]  # the reference first
    ref, merged, base = rows["adapter"], rows["merged"], rows["base"]
    assert float(ref["exact_match"]) == 1.0 and float(ref["mean_kl"]) == 0.0
    assert (
        0 < float(merged["max_abs_logit_diff"]) < float(base["max_abs_logit_diff"])
    )  # rounding < the whole update
    assert 0 < float(merged["mean_kl"]) < float(base["mean_kl"])
    for row in rows.values():
        assert (
            float(row["eval_perplexity"]) > 1 and float(row["tokens_per_s"]) > 0 and float(row["load_s"]) > 0
        )
    assert (job / "comparison.md").read_text() in capsys.readouterr().out
    assert len((job / "comparison_generations.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------- chat


def test_chat_through_piped_stdin(fp32_run, tmp_path):
    cfg, run_dir = fp32_run
    # the same message through infer (greedy, one prompt): chat's first reply must be the same text
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a fruit.\n")
    expected = infer.run(
        make_cfg(
            [*TINY, "quantization=none", f"inference.prompts_file={prompts}", "generation.max_new_tokens=6"]
        ),
        Run(dir=tmp_path, source=run_dir),
    )[0]["output"]

    stdin = "Name a fruit.\nAnd another?\n/reset\n\nName a fruit.\n/exit\nnever read\n"
    result = run_main(
        *TINY,
        "pipeline=chat",
        f"run_dir={run_dir}",
        "generation.max_new_tokens=6",
        f"hydra.run.dir={tmp_path / 'job'}",
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    replies = [line[len("assistant> ") :] for line in out.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 3 and "(history cleared)" in out and out.rstrip().endswith("bye")
    assert "never read" not in out  # /exit stops reading
    assert replies[0].strip() == expected.strip() == replies[2].strip()  # after /reset: the same fresh start
    assert json.loads((tmp_path / "job" / "metrics.json").read_text())["chat/turns"] == 3


def test_chat_keeps_a_system_prompt_and_the_history_as_a_conversation(
    fp32_run, tmp_path, monkeypatch, tokenizer
):
    import io
    import sys

    from qlora_lab.pipelines import chat

    _, run_dir = fp32_run
    seen = []
    monkeypatch.setattr(
        "qlora_lab.inference.render_prompt",  # chat fits the context with inference's rule
        lambda *a, **k: seen.append(render_prompt(*a, **k)) or seen[-1],
    )
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Name a fruit.\nAnd another?\n")))
    cfg = make_cfg(
        [
            *TINY,
            "quantization=none",
            "pipeline=chat",
            "chat.system_prompt=Answer in one word.",
            "dataset.system_prompt=never used",
            "generation.max_new_tokens=3",
        ]
    )
    conversation = chat.run(cfg, Run(dir=tmp_path, source=run_dir))
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user", "assistant"]
    assert (
        conversation[0]["content"] == "Answer in one word." and conversation[3]["content"] == "And another?"
    )
    # the second prompt is the whole conversation so far, rendered as training renders it
    assert seen[1] == render_prompt(conversation[:4], tokenizer, cfg.dataset)
    assert (
        seen[1].startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
        and "never used" not in seen[1]
    )


def test_chat_renders_the_whole_history(tokenizer):
    history = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    text = render_prompt(history, tokenizer, make_cfg().dataset)  # what pipeline=chat gives the model
    assert text.index("first question") < text.index("first answer") < text.index("second question")
    assert text.endswith("<|im_start|>assistant\n")
    plain = render_prompt(history, tokenizer, make_cfg(["dataset.template=plain"]).dataset)
    assert plain.endswith("### Instruction:\nsecond question\n\n### Answer:\n") and "first answer" in plain


# ---------------------------------------------------------------- wrong run_dir


def test_wrong_run_dir_is_one_sentence(tmp_path, nf4_run):
    result = run_main(
        *TINY, "pipeline=infer", f"run_dir={tmp_path / 'no_such_run'}", f"hydra.run.dir={tmp_path / 'a'}"
    )
    assert_one_sentence_error(result, "run_dir=", "does not exist")

    _, run_dir = nf4_run
    unmerged = tmp_path / "unmerged"
    shutil.copytree(run_dir, unmerged, ignore=shutil.ignore_patterns("merged"))
    cfg = make_cfg([*TINY, "quantization=nf4", "inference=merged"])
    with pytest.raises(ConfigError, match="has no merged model .* pipeline=merge"):
        infer.run(cfg, Run(dir=tmp_path, source=unmerged))
    shutil.rmtree(unmerged / "adapter")
    with pytest.raises(ConfigError, match="has no trained adapter"):
        merge.run(cfg, Run(dir=tmp_path, source=unmerged))
