"""Shared helpers: compose configs in-process, run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qlora_lab.config import register

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# Small and fast: short sequences keep the tiny model's 49k-vocab logits cheap.
TINY = ["model=tiny_random", "dataset.size=24", "dataset.eval_size=8", "dataset.max_seq_length=96",
        "train.max_steps=8", "train.batch_size=4", "train.learning_rate=5e-3", "train.report_to=[]",
        "train.logging_steps=1"]

register()


def make_cfg(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def cli(*args: str, cwd: Path = ROOT, stdin: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "qlora_lab", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tokenizer():
    from qlora_lab.models import load_tokenizer, tokenizer_path

    return load_tokenizer(tokenizer_path(make_cfg()))
