"""int8_dynamic: <run>/export/int8_dynamic (written by the export stage): dynamic int8 linear layers, CPU
only."""

from __future__ import annotations

from pathlib import Path

from ..config import InferenceMode
from ..layout import RunLayout
from . import InferenceModeSpec


def available(run_dir: Path) -> bool:
    return RunLayout(run_dir).int8_export.is_dir()


def load(cfg, source: Path):
    from .. import int8_dynamic
    from ..inference import int8_export_dir
    from ..models import load_tokenizer

    folder = int8_export_dir(source)
    tokenizer = load_tokenizer(str(folder), cfg.model.trust_remote_code)
    return int8_dynamic.load(folder), tokenizer  # PyTorch's int8 kernels are CPU kernels: it stays on the CPU


MODE = InferenceModeSpec(
    InferenceMode.int8_dynamic,
    "<run_dir>/export/int8_dynamic (the export stage's), on the CPU",
    available,
    load,
)
