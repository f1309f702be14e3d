"""Every experiment composes; the schema catches typos and impossible combinations at compose time."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from qlora_lab.config import ConfigError, QuantMethod
from qlora_lab.validation import validate

from .conftest import CONF, make_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


# Experiments meant for `accelerate launch` with an FSDP config validate under that launcher's environment,
# on GPUs (train.activation_offload needs one)
LAUNCH_ENV = {"multi_gpu_70b": {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name, monkeypatch):
    import qlora_lab.layer_graphs

    for key, value in LAUNCH_ENV.get(name, {}).items():
        monkeypatch.setenv(key, value)
    if name in LAUNCH_ENV:
        monkeypatch.setattr(qlora_lab.layer_graphs, "gpu_available", lambda: True)
    cfg = make_cfg([f"+experiment={name}"])
    validate(cfg)
    assert cfg.pipeline.stages


@pytest.mark.parametrize(
    "group,options",
    [
        ("model", ["smollm2_135m", "tiny_random"]),
        ("quantization", ["none", "nf4", "fp4", "int8"]),
        ("lora", ["default", "qv"]),
        ("dataset", ["alpaca", "alpaca_zh", "gsm8k", "glaive_toolcall_zh"]),
        ("generation", ["greedy", "sampling"]),
        ("inference", ["adapter", "merged", "merge_and_unload", "base"]),
        ("pipeline", ["train", "merge", "infer", "compare", "evaluate", "chat", "benchmark"]),
    ],
)
def test_every_group_option_composes(group, options):
    for option in options:
        validate(make_cfg([f"{group}={option}"]))


def test_quantization_options_map_to_methods():
    assert make_cfg(["quantization=none"]).quantization.method is QuantMethod.none
    nf4 = make_cfg(["quantization=nf4"]).quantization
    assert nf4.method is QuantMethod.nf4 and nf4.double_quant is True
    assert make_cfg(["lora=qv"]).lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg(["lora.rank=8"])
    assert "rank" in str(e.value.__cause__ or e.value)


def test_unknown_group_option_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="nf5"):
        make_cfg(["quantization=nf5"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        make_cfg(["train.grad_accum=four"])  # (train.batch_size also takes `auto`: validate() checks it)
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make_cfg(["quantization.method=nf5"])


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["quantization=none", "quantization.double_quant=true"], "quantization.double_quant"),
        (["quantization=none", "quantization.storage_dtype=bfloat16"], "quantization.storage_dtype"),
        (["quantization=int8", "quantization.double_quant=true"], "quantization.double_quant"),
        (["quantization=nf4", "quantization.int8_threshold=5.0"], "quantization.int8_threshold"),
        (["quantization=none", "quantization.compute_dtype=bfloat16"], "quantization.compute_dtype"),
        (["lora.r=0"], "lora.r"),
        (["dataset.size=0"], "dataset.size"),
    ],
)
def test_unsupported_combinations_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(make_cfg(overrides))


# A misspelt key and a misspelt option in every group, and a misspelt value of every field with a fixed set of
# values: (override, the word the error must name).
TYPOS = [
    ("model.name_or_pth=x", "name_or_pth"),
    ("model=tiny_randm", "tiny_randm"),
    ("model.dtype=bf61", "bf61"),
    ("quantization.doublequant=true", "doublequant"),
    ("quantization=nf5", "nf5"),
    ("quantization.method=nf5", "nf5"),
    ("quantization.compute_dtype=fp8", "fp8"),
    ("quantization.storage_dtype=int4", "int4"),
    ("quantization.preparation=upcast", "upcast"),
    ("lora.rank=8", "rank"),
    ("lora=qk", "qk"),
    ("lora.bias=lora_onyl", "lora_onyl"),
    ("dataset.max_seq_len=64", "max_seq_len"),
    ("dataset=alpacca", "alpacca"),
    ("dataset.template=chatml", "chatml"),
    ("train.lr=1e-4", "lr"),
    ("train=fastest", "fastest"),
    ("train.precision=fp8", "fp8"),
    ("train.kernels=triton", "triton"),
    ("generation.temp=0.5", "temp"),
    ("generation=beam", "beam"),
    ("inference.mode=mergd", "mergd"),
    ("inference=mergd", "mergd"),
    ("inference.modes=[adapter,mergd]", "mergd"),
    ("export.format=ggml", "ggml"),
    ("export=onnx", "onnx"),
    ("export.gguf_type=q5_k", "q5_k"),
    ("pipeline.stage=[train]", "stage"),
    ("pipeline=trian", "trian"),
    ("paths.out_dir=x", "out_dir"),
    ("paths=local", "local"),
    ("recipe=fastest", "fastest"),
    ("merge.base=orig", "orig"),
    ("merge.shard_size=1GB", "shard_size"),
    ("eval.metrics=[rouge,bleuu]", "bleuu"),
    ("eval.modes=[bse]", "bse"),
    ("eval.language=fr", "fr"),
    ("eval.max_sample=3", "max_sample"),
    ("+experiment=gsm8", "gsm8"),
    ("lora.variant=vera", "vera"),
    ("lora.init=pisa", "pisa"),
    ("+qlora_variant=dora", "dora"),
]


@pytest.mark.parametrize("override,typo", TYPOS, ids=[t[0] for t in TYPOS])
def test_typo_in_every_group_fails_at_compose_time(override, typo):
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg([override])
    message = f"{e.value} {e.value.__cause__}"
    assert f"'{typo}'" in message or f"={typo}" in message or f"/{typo}" in message, message


def test_issue_example_fails_before_training(tmp_path):
    """`+experiment=gsm8k eval.metrics=[rouge,bleuu]` used to fail after training: now Hydra refuses it at
    once."""
    from .conftest import run_main

    result = run_main("+experiment=gsm8k", "eval.metrics=[rouge,bleuu]", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1 and "Invalid value 'bleuu', expected one of" in result.stderr, (
        result.stderr[-2000:]
    )
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_fsdp_with_a_4bit_base_needs_a_storage_dtype(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"quantization\.storage_dtype"):
        validate(make_cfg(["quantization=nf4", "quantization.storage_dtype=null"]))
    validate(make_cfg(["quantization=nf4", "quantization.storage_dtype=bfloat16"]))


def test_int8_threshold_zero_is_kept():
    """0.0 is a threshold (no fp16 outlier path), not "unset": only null means bitsandbytes' default 6.0."""
    import torch

    from qlora_lab.models import bnb_config

    assert (
        bnb_config(
            make_cfg(["quantization=int8", "quantization.int8_threshold=0.0"]).quantization, torch.float32
        ).llm_int8_threshold
        == 0.0
    )
    assert bnb_config(make_cfg(["quantization=int8"]).quantization, torch.float32).llm_int8_threshold == 6.0
