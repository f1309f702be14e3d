"""Exact training values, as torchtune's recipe tests do: the tiny model, 4 steps, each step's loss equal to
the recorded value. Any change to the data, the prompt format, the label masking, the model build, the
quantization of the base, LoRA's initialisation or the optimizer settings moves them.

The values were recorded on a CPU: the fp32 ones with torch 2.13, transformers 5.23 and peft 0.21, the QLoRA
ones with torch 2.13, transformers 5.24, peft 0.21 and bitsandbytes 0.50. A new version of one of them may
move them too (then check why, and record the new values, which `python -m tests.test_exact_values`
prints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_lab.pipelines import train
from qlora_lab.rundir import Run

from .conftest import make_cfg

EXACT = [
    "model=tiny_random",
    "quantization=none",
    "model.dtype=float32",
    "train.precision=fp32",
    "dataset.size=16",
    "dataset.eval_size=4",
    "dataset.max_seq_length=96",
    "train.max_steps=4",
    "train.batch_size=4",
    "train.learning_rate=5e-3",
    "train.logging_steps=1",
    "train.report_to=[]",
    "train.eval_before=false",
]
LOSSES = [10.803953170776367, 10.804471969604492, 10.729155540466309, 10.705175399780273]  # steps 1..4
# QLoRA: the same run on the base quantized by bitsandbytes (nf4 and fp4 with their default settings, int8)
QUANTIZED_LOSSES = {
    "nf4": [10.804476737976074, 10.805781364440918, 10.732402801513672, 10.70357894897461],
    "fp4": [10.804715156555176, 10.800126075744629, 10.723575592041016, 10.700685501098633],
    "int8": [10.803902626037598, 10.804494857788086, 10.729236602783203, 10.704835891723633],
}


def step_losses(run_dir: Path, overrides: list[str]) -> list[float]:
    cfg = make_cfg([*EXACT, *overrides])
    run = Run(dir=run_dir, source=run_dir)
    run.start(cfg)
    train.run(cfg, run)
    run.finish()
    state = json.loads((run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_per_step_losses_equal_the_recorded_values(tmp_path):
    assert step_losses(tmp_path, []) == pytest.approx(LOSSES, abs=1e-5)


@pytest.mark.parametrize("quant", list(QUANTIZED_LOSSES))
def test_qlora_per_step_losses_equal_the_recorded_values(tmp_path, quant):
    assert step_losses(tmp_path, [f"quantization={quant}"]) == pytest.approx(
        QUANTIZED_LOSSES[quant], abs=1e-5
    )


if __name__ == "__main__":
    import tempfile

    from qlora_lab.config import register

    register()
    for name, overrides in [("none", [])] + [(q, [f"quantization={q}"]) for q in QUANTIZED_LOSSES]:
        with tempfile.TemporaryDirectory() as tmp:
            print(name, step_losses(Path(tmp), overrides))
