"""Every experiment composes; the schema catches typos and impossible combinations at compose time."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from qlora_lab.config import ConfigError, QuantMethod, validate

from .conftest import CONF, make_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = make_cfg([f"+experiment={name}"])
    validate(cfg)
    assert cfg.pipeline.stages


@pytest.mark.parametrize("group,options", [
    ("model", ["smollm2_135m", "tiny_random"]),
    ("quantization", ["none", "nf4", "fp4", "int8"]),
    ("lora", ["default", "qv"]),
    ("dataset", ["alpaca", "alpaca_zh", "gsm8k", "glaive_toolcall_zh"]),
    ("generation", ["greedy", "sampling"]),
    ("inference", ["adapter", "merged", "merge_and_unload", "base"]),
    ("pipeline", ["train", "merge", "infer", "compare", "evaluate", "chat", "benchmark"]),
])
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


@pytest.mark.parametrize("overrides,field", [
    (["quantization=none", "quantization.double_quant=true"], "quantization.double_quant"),
    (["quantization=none", "quantization.storage_dtype=bfloat16"], "quantization.storage_dtype"),
    (["quantization=int8", "quantization.double_quant=true"], "quantization.double_quant"),
    (["quantization=nf4", "quantization.int8_threshold=5.0"], "quantization.int8_threshold"),
    (["quantization=none", "quantization.compute_dtype=bfloat16"], "quantization.compute_dtype"),
    (["lora.r=0"], "lora.r"),
    (["dataset.size=0"], "dataset.size"),
])
def test_unsupported_combinations_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(make_cfg(overrides))
