"""adapter: the base quantized as in training + the unmerged PEFT adapter (what was trained)."""

from __future__ import annotations

from pathlib import Path

from ..config import InferenceMode
from ..layout import RunLayout
from . import InferenceModeSpec


def available(run_dir: Path) -> bool:
    return RunLayout(run_dir).adapter_config.is_file()


def load(cfg, source: Path):
    from peft import PeftModel

    from ..inference import adapter_dir, resize_embeddings
    from ..models import load_model, load_tokenizer, model_path

    adapter = adapter_dir(source)
    tokenizer = load_tokenizer(str(adapter), cfg.model.trust_remote_code)  # saved with the adapter by train
    model = load_model(model_path(cfg), cfg)  # quantized exactly as in training
    resize_embeddings(model, tokenizer)
    return PeftModel.from_pretrained(model, adapter), tokenizer


MODE = InferenceModeSpec(
    InferenceMode.adapter, "base (quantized as in training) + unmerged PEFT adapter", available, load
)
