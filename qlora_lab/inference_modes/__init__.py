"""Inference modes (inference.mode, inference.modes): one file per mode, each holding one InferenceModeSpec:
its doc line, whether a run folder has the files it loads, and how it loads (qlora_lab/inference.py
load_for_inference adds what every mode shares). A new mode: a file here, an InferenceMode member in
config.py, and its MODE added to MODES below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import InferenceMode


@dataclass(frozen=True)
class InferenceModeSpec:
    mode: InferenceMode
    doc: str
    available: Callable[[Path], bool]  # whether a run folder has what this mode loads (the web app's choices)
    load: Callable[..., tuple]  # (cfg, run folder) -> (model, tokenizer)


def _modes() -> dict[InferenceMode, InferenceModeSpec]:
    from . import adapter, base, int8_dynamic, merge_and_unload, merged

    return {
        spec.mode: spec
        for spec in (adapter.MODE, merge_and_unload.MODE, merged.MODE, int8_dynamic.MODE, base.MODE)
    }


MODES = _modes()  # the web app offers a run's modes in this order
