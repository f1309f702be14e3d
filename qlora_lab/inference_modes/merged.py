"""merged: <run>/merged/ from disk (written by the merge stage), quantized per cfg.quantization."""

from __future__ import annotations

from pathlib import Path

from ..config import InferenceMode
from ..layout import RunLayout
from . import InferenceModeSpec


def available(run_dir: Path) -> bool:
    return RunLayout(run_dir).merged_config.is_file()


def load(cfg, source: Path):
    from ..inference import merged_dir
    from ..models import load_model, load_tokenizer

    folder = merged_dir(source)
    tokenizer = load_tokenizer(str(folder), cfg.model.trust_remote_code)
    return load_model(
        str(folder), cfg
    ), tokenizer  # quantized per cfg.quantization, like merged weights in 4-bit


MODE = InferenceModeSpec(InferenceMode.merged, "merged weights loaded from <run_dir>/merged", available, load)
