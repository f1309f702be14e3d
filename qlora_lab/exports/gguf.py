"""gguf: one .gguf file for llama.cpp / Ollama (weights, tokenizer, chat template), written by
qlora_lab/gguf_export.py."""

from __future__ import annotations

from pathlib import Path

from ..config import ExportFormat, GgufType
from ..layout import RunLayout
from . import ExportSpec

BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}  # ggml's block sizes


def path(source: Path, gguf_type: str | None) -> Path:
    return RunLayout(source).export / f"model-{gguf_type}.gguf"


def check(cfg, source: Path, model_config: dict, adapter: Path) -> None:
    from .. import gguf_export

    gguf_export.check_supported(model_config)
    gguf_export.check_tokenizer(adapter)  # train saves the tokenizer with the adapter; merge copies it


def write(merged: Path, target: Path, gguf_type: str | None, name: str, about: dict) -> dict:
    from .. import gguf_export

    return gguf_export.write_gguf(merged, target, gguf_type, name, about)


def load(path: Path, cfg):
    """transformers dequantizes the file to fp32; the tokenizer is the one embedded in the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


EXPORT = ExportSpec(
    ExportFormat.gguf,
    doc="one .gguf file for llama.cpp / Ollama (weights, tokenizer, chat template)",
    path=path,
    write=write,
    load=load,
    bytes_per_weight=BYTES_PER_WEIGHT.__getitem__,
    variants=tuple(t.value for t in GgufType),
    check=check,
    own_tokenizer=True,
)
