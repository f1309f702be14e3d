"""Pipeline stages. A stage is a function `run(cfg, run)`; the registry maps its name to its module.

Modules are imported only when their stage runs, so `pipeline=chat` does not pay for the Trainer.
"""

from __future__ import annotations

import importlib

STAGES = {
    "train": "qlora_lab.pipelines.train",
    "merge": "qlora_lab.pipelines.merge",
    "infer": "qlora_lab.pipelines.infer",
    "compare": "qlora_lab.pipelines.compare",
    "chat": "qlora_lab.pipelines.chat",
    "evaluate": "qlora_lab.pipelines.evaluate",
    "export": "qlora_lab.pipelines.export",
    "web": "qlora_lab.pipelines.web",
}


def get_stage(name: str):
    """The stage's `run` function (validation.validate() has already refused unknown names)."""
    return importlib.import_module(STAGES[name]).run
