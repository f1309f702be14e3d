"""int8_dynamic: PyTorch dynamic int8 linear layers, for CPU inference in Python (qlora_lab/int8_dynamic.py);
loaded back by inference.mode=int8_dynamic."""

from __future__ import annotations

from pathlib import Path

from ..config import ExportFormat
from ..layout import RunLayout
from . import ExportSpec


def path(source: Path, variant: str | None) -> Path:
    return RunLayout(source).int8_export


def write(merged: Path, target: Path, variant: str | None, name: str, about: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import int8_dynamic

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    int8_dynamic.save(model, AutoTokenizer.from_pretrained(merged), target)
    return {}


def load(path: Path, cfg):
    from .. import int8_dynamic
    from ..models import load_tokenizer

    return int8_dynamic.load(path), load_tokenizer(str(path), cfg.model.trust_remote_code)


EXPORT = ExportSpec(
    ExportFormat.int8_dynamic,
    doc="PyTorch dynamic int8 linear layers, for CPU inference in Python",
    path=path,
    write=write,
    load=load,
    bytes_per_weight=lambda variant: 1,
)
