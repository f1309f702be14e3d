"""base: the base model alone, no adapter (the "before" of a comparison); needs no run."""

from __future__ import annotations

from pathlib import Path

from ..config import InferenceMode
from . import InferenceModeSpec


def load(cfg, source: Path):
    from ..models import load_model, load_tokenizer, model_path, tokenizer_path

    tokenizer = load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code)
    return load_model(model_path(cfg), cfg), tokenizer


MODE = InferenceModeSpec(InferenceMode.base, "the base model alone, no adapter", lambda run_dir: True, load)
