"""Export to GGUF and dynamic int8 on the tiny random model: read back, compared with merged/, bad input
refused."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from qlora_lab import gguf_export
from qlora_lab.config import ConfigError
from qlora_lab.inference import eval_prompts
from qlora_lab.models import load_tokenizer
from qlora_lab.pipelines import export, infer
from qlora_lab.rundir import Run

from .conftest import TINY, assert_one_sentence_error, copy_run, make_cfg, run_main

FAST = [
    "generation.max_new_tokens=6",
    "inference.num_prompts=2",
    "inference.batch_size=2",
    "inference.agreement_examples=2",
]
# q8_0 stores every weight as int8 with one fp16 scale per 32 values. The tiny random model's next-token
# distributions are near uniform, so its mean KL to merged is small: ~5e-7 measured. The bound catches a file
# whose blocks decode to the wrong values; the Q/K order is checked exactly by the f16 test below.
Q8_0_KL_BOUND = 1e-4


@pytest.fixture(scope="module")
def export_run(lora_run, tmp_path_factory):
    """A copy of the session's tiny LoRA run, not merged: the export merges it first."""
    cfg, run_dir = lora_run
    return cfg, copy_run(run_dir, tmp_path_factory, "export_run")


@pytest.fixture(scope="module")
def exported(export_run, tmp_path_factory):
    """`pipeline=export` through the command line (in-process): q8_0 GGUF and int8, each measured against
    merged/."""
    _, run_dir = export_run
    job = tmp_path_factory.mktemp("export_job") / "job"
    result = run_main(
        *TINY,
        "pipeline=export",
        f"run_dir={run_dir}",
        "export.targets=[gguf:q8_0,int8_dynamic]",
        *FAST,
        f"hydra.run.dir={job}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, job, result


def test_export_merges_first_writes_and_measures(exported):
    run_dir, job, result = exported
    assert (run_dir / "merged" / "merge_report.json").is_file()  # no merged/ before: the export merged it
    assert (run_dir / "export" / "model-q8_0.gguf").is_file() and (
        run_dir / "export" / "int8_dynamic"
    ).is_dir()
    report = json.loads((run_dir / "export" / "export_report.json").read_text())
    assert set(report) == {"trained", "base", "merged", "gguf-q8_0", "int8_dynamic"}
    for row in report.values():
        assert row["load_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_gib"] > 0
        assert row["eval_perplexity"] > 1 and len(row["outputs"]) == 2
        assert row["size_mib"] is None if row["export"] == "trained" else row["size_mib"] > 0
    # what fine-tuning taught, kept: all of it by the trained model itself, none by the base
    assert report["trained"]["learnt_kept"] == 1 and report["base"]["learnt_kept"] == 0
    assert report["trained"]["trained_exact_match"] == 1 and report["trained"]["trained_mean_kl"] == 0
    # a LoRA run: merged computes what was trained
    assert report["merged"]["trained_mean_kl"] < 1e-6 and report["merged"]["learnt_kept"] == pytest.approx(
        1, abs=0.01
    )
    assert report["gguf-q8_0"]["learnt_kept"] == pytest.approx(1, abs=0.1)
    q8 = report["gguf-q8_0"]
    assert 0 < q8["mean_kl"] < Q8_0_KL_BOUND
    assert (
        q8["tensor_types"]["Q8_0"] == 2 * 7 + 1
    )  # 7 matrices a layer + the (tied) embedding; norms stay F32
    assert (
        q8["tokenizer_match"] == 1.0 and q8["chat_template_match"] is True
    )  # tokenizer embedded in the file
    assert q8["size_mib"] < report["merged"]["size_mib"] / 2  # ~1 byte a weight instead of 4
    assert report["int8_dynamic"]["mean_kl"] > 0
    assert "| gguf-q8_0 |" in result.stdout and "| int8_dynamic |" in result.stdout  # the printed table
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["export/gguf-q8_0/mean_kl"] == q8["mean_kl"]


def test_gguf_f16_reloads_with_merged_logits(exported, tmp_path):
    run_dir, _, _ = exported
    merged = run_dir / "merged"
    gguf_export.write_gguf(merged, tmp_path / "model.gguf", "f16", "test")
    cfg = make_cfg([*TINY, "quantization=none"])
    tokenizer = load_tokenizer(str(merged))
    ids = tokenizer(eval_prompts(cfg, tokenizer, 1)[0]["prompt"], return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, reloaded(input_ids=ids).logits
        # f16 stores the matrices in fp16 (11 significant bits) and the norms in fp32: merged with exactly
        # that rounding must give the same logits. (Q and K rows left in transformers' order differ by ~6e-4
        # here.)
        for param in reference.parameters():
            if param.ndim == 2:
                param.copy_(param.half().float())
        rounded = reference(input_ids=ids).logits
    torch.testing.assert_close(got, rounded, rtol=0, atol=1e-6)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3 * scale)  # fp16 tolerance of merged itself
    assert (got - expected).abs().max() > 0  # it did go through fp16


def test_qk_permutation_is_what_transformers_reader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    n_head, n_kv, head_dim = 4, 2, 8
    reader = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    for name, heads in (("blk.0.attn_q.weight", n_head), ("blk.0.attn_k.weight", n_kv)):
        weight = torch.randn(heads * head_dim, 16)
        permuted = gguf_export.permute_for_llama_cpp(weight, heads)
        assert not torch.equal(permuted, weight)
        back = reader.process(permuted.numpy(), name).weights
        assert torch.equal(torch.from_numpy(back), weight)


def test_int8_export_reloads_and_generates(exported, tmp_path):
    run_dir, _, _ = exported
    cfg = make_cfg([*TINY, "quantization=none", "inference=int8_dynamic", *FAST])
    run = Run(dir=tmp_path, source=run_dir)
    infer.run(cfg, run)
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["mode"] for r in rows} == {"int8_dynamic"}
    assert all(1 <= r["new_tokens"] <= 6 and isinstance(r["output"], str) for r in rows)
    state = torch.load(run_dir / "export" / "int8_dynamic" / "model_int8.pt", weights_only=True)
    packed = [k for k in state if k.endswith("_packed_params._packed_params")]
    assert len(packed) == 2 * 4 and state[packed[0]][0].dtype == torch.qint8  # q, k, o, gate of each layer
    assert not any(k.startswith(("lm_head", "model.layers.0.mlp.down_proj")) and "packed" in k for k in state)


# ---------------------------------------------------------------- bad input


def test_existing_export_is_never_overwritten_silently(exported, tmp_path):
    run_dir, _, _ = exported
    target = run_dir / "export" / "model-q8_0.gguf"
    before = target.read_bytes()
    result = run_main(
        *TINY,
        "pipeline=export",
        f"run_dir={run_dir}",
        "export.gguf_type=q8_0",
        f"hydra.run.dir={tmp_path / 'job'}",
    )
    assert result.returncode == 2
    assert_one_sentence_error(result, str(target), "export.overwrite=true")
    assert target.read_bytes() == before


def test_run_without_adapter_is_one_sentence(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(make_cfg([*TINY, "quantization=none"]), run_dir / ".hydra" / "config.yaml")
    result = run_main(*TINY, "pipeline=export", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'job'}")
    assert result.returncode == 2
    assert_one_sentence_error(result, "no trained adapter")
    assert not (run_dir / "merged").exists() and not (run_dir / "export").exists()


def test_unsupported_architecture_is_named(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "merged").mkdir()
    (run_dir / "merged" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    cfg = make_cfg([*TINY, "quantization=none", "export.gguf_type=f16"])
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        export.run(cfg, Run(dir=tmp_path, source=run_dir))
    assert not (run_dir / "export").exists()
    with pytest.raises(ConfigError, match="rope_type=llama3"):
        gguf_export.check_supported(
            {"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "llama3"}}
        )
    with pytest.raises(ConfigError, match="export.targets has 'gguf:q3'"):
        export.targets(make_cfg(["export.targets=[gguf:q3]"]))


@pytest.mark.parametrize(
    "pre,name",
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}],
            },
            "smollm",
        ),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": gguf_export.LLAMA3_SPLIT}},
                    {"type": "ByteLevel", "use_regex": False},
                ],
            },
            "llama-bpe",
        ),
    ],
)
def test_pre_tokenizer_names(pre, name):
    assert gguf_export.pre_tokenizer_name({"pre_tokenizer": pre}) == name


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ConfigError, match="pre-tokenizer"):
        gguf_export.pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


# ---------------------------------------------------------- what llama.cpp reads: token types, pre-tokenizer,
# add_bos, provenance (transformers' GGUF reader ignores token types, so only reading the file checks them)


def gguf_value(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def test_gguf_tokenizer_keys_are_what_llama_cpp_needs(tmp_path):
    """The tiny model with SmolLM2's real tokenizer, written as llama.cpp would read it back."""
    import shutil

    from gguf import GGUFReader, TokenType

    from qlora_lab.models import model_path, tokenizer_path

    cfg = make_cfg([*TINY, "quantization=none"])
    folder = tmp_path / "merged"
    shutil.copytree(model_path(cfg), folder)
    load_tokenizer(tokenizer_path(cfg)).save_pretrained(folder)
    about = export.provenance(make_cfg(["model=smollm2_135m"]), tmp_path / "run")
    gguf_export.write_gguf(folder, tmp_path / "model.gguf", "f16", "test", about)

    reader = GGUFReader(tmp_path / "model.gguf")
    tokens, types = (
        gguf_value(reader, "tokenizer.ggml.tokens"),
        gguf_value(reader, "tokenizer.ggml.token_type"),
    )
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    added = {t["id"]: t for t in tokenizer_json["added_tokens"]}
    expected = [
        TokenType.CONTROL
        if i in added and added[i]["special"]
        else TokenType.USER_DEFINED
        if i in added
        else TokenType.NORMAL
        for i in range(len(tokens))
    ]
    assert types == expected
    assert types[1] == TokenType.CONTROL and tokens[1] == "<|im_start|>"  # the chat template's turn markers
    assert types.count(TokenType.CONTROL) == 17 and types.count(TokenType.NORMAL) == len(tokens) - 17
    assert (
        gguf_value(reader, "tokenizer.ggml.pre") == "smollm"
    )  # SmolLM2's digit splitting, as llama.cpp names it
    assert (
        gguf_value(reader, "tokenizer.ggml.add_bos_token") is False
    )  # the chat template writes every marker
    assert gguf_value(reader, "general.base_model.count") == 1
    assert gguf_value(reader, "general.base_model.0.name") == "SmolLM2-135M-Instruct"
    assert gguf_value(reader, "general.base_model.0.organization") == "HuggingFaceTB"
    assert (
        gguf_value(reader, "general.base_model.0.repo_url")
        == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert gguf_value(reader, "general.license") == "apache-2.0"
    assert gguf_value(reader, "general.finetune") == "qlora-nf4"
    assert "fine-tune" in gguf_value(reader, "general.tags")


def test_token_types_of_added_and_unused_ids():
    tokenizer_json = {
        "model": {"vocab": {"a": 0, "b": 1}},
        "added_tokens": [
            {"id": 2, "content": "<|eot|>", "special": True},
            {"id": 3, "content": "<|tool|>", "special": False},  # looks special
            {"id": 4, "content": "<name>", "special": False},
        ],
    }
    tokens, types = gguf_export.token_list(tokenizer_json, 6, None)
    assert tokens == ["a", "b", "<|eot|>", "<|tool|>", "<name>", "[PAD5]"]
    T = gguf_export.gguf.TokenType
    assert types == [T.NORMAL, T.NORMAL, T.CONTROL, T.CONTROL, T.USER_DEFINED, T.UNUSED]
    with pytest.raises(ConfigError, match="5 tokens but the model only 4 embedding rows"):
        gguf_export.token_list(tokenizer_json, 4, "folder")


def test_int8_keeps_the_sensitive_layers_float_and_its_footprint_counts_every_weight(tmp_path):
    from qlora_lab import int8_dynamic
    from qlora_lab.models import memory_footprint_gib, model_path, tokenizer_path

    cfg = make_cfg([*TINY, "quantization=none"])
    model = AutoModelForCausalLM.from_pretrained(model_path(cfg), dtype=torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fp32_bytes = sum(
        t.numel() * 4 for t in [*model.parameters(), *model.buffers(), linears["lm_head"].weight]
    )  # untied
    quantized = [n for n in linears if n.rsplit(".", 1)[-1] not in int8_dynamic.FLOAT_LAYERS]
    quantized_bytes = sum(linears[n].weight.numel() * 4 for n in quantized)
    int8_dynamic.save(model, load_tokenizer(tokenizer_path(cfg)), tmp_path / "int8")
    loaded = int8_dynamic.load(tmp_path / "int8")
    modules = dict(loaded.named_modules())
    assert all(
        type(modules[n]) is torch.nn.Linear for n in linears if n not in quantized
    )  # float: lm_head, down...
    assert all(type(modules[n]).__module__.startswith("torch.ao.nn.quantized.dynamic") for n in quantized)
    # every weight: the float ones at 4 bytes, the int8 ones at 1 byte plus a scale and zero point per row
    overhead = sum(linears[n].out_features * 16 for n in quantized)
    footprint = memory_footprint_gib(loaded) * 2**30
    assert fp32_bytes - 0.75 * quantized_bytes <= footprint <= fp32_bytes - 0.75 * quantized_bytes + overhead
