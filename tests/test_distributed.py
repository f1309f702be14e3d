"""DDP through `accelerate launch`: 2 CPU processes (gloo) train the tiny model; both ranks end with the same adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, TINY


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_two_process_ddp_ranks_agree(tmp_path, quant):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(ROOT / "accelerate" / "cpu_ddp_2proc.yaml"),
         "-m", "qlora_lab", *TINY, f"quantization={quant}", "train.batch_size=2", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["distributed/world_size"] == 2
    assert metrics["distributed/adapters_identical"] is True
    assert len(set(metrics["distributed/adapter_sha256"])) == 1
    assert metrics["eval/loss"] < metrics["eval/loss_before"]
    # the two ranks split each epoch: 8 steps x 2 ranks x 2 examples = 32 examples seen of 24
    assert metrics["train/steps"] == 8 and metrics["train/tokens_seen"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "run.json").read_text())["hardware"]["world_size"] == 2


def test_slurm_launcher_preset_composes():
    from hydra import compose, initialize_config_dir

    from .conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240
