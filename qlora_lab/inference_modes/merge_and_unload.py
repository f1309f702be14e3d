"""merge_and_unload: the adapter's base + adapter, merged in memory by PEFT (on a 4-bit base PEFT dequantizes,
adds the LoRA delta and quantizes again)."""

from __future__ import annotations

from pathlib import Path

from ..config import InferenceMode
from . import InferenceModeSpec, adapter


def load(cfg, source: Path):
    model, tokenizer = adapter.load(cfg, source)
    return model.merge_and_unload(), tokenizer


MODE = InferenceModeSpec(
    InferenceMode.merge_and_unload, "base + adapter merged in memory", adapter.available, load
)
