"""RunLayout: the paths inside a run folder, named once. What one stage writes and a later one (or the web
app, the sweep report, a resumed run) reads is found through this, never through a string literal of its
own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # ---- bookkeeping (qlora_lab/rundir.py) and Hydra's own files
    @property
    def run_json(self) -> Path:  # what ran, where, how it ended
        return self.root / "run.json"

    @property
    def metrics_json(self) -> Path:  # flat numbers
        return self.root / "metrics.json"

    @property
    def hydra(self) -> Path:  # Hydra's output subdir (also holds the run's lock file)
        return self.root / ".hydra"

    @property
    def config(self) -> Path:  # the composed config the job ran with; a folder with one is a run
        return self.hydra / "config.yaml"

    @property
    def overrides(self) -> Path:
        return self.hydra / "overrides.yaml"

    @property
    def hydra_yaml(self) -> Path:  # Hydra's own settings of the job (its sweeper and launcher)
        return self.hydra / "hydra.yaml"

    @property
    def lock(self) -> Path:  # held by the process that runs in the folder
        return self.hydra / "lock"

    # ---- what the stages write
    @property
    def checkpoints(self) -> Path:  # train: the Trainer's checkpoints, to resume from
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def profile_txt(self) -> Path:  # train.profile=true: the profiler's tables
        return self.root / "profile.txt"

    @property
    def profile_trace(self) -> Path:  # train.profile=true: a Chrome trace
        return self.root / "profile_trace.json"

    @property
    def generations(self) -> Path:  # infer: one line per prompt
        return self.root / "generations.jsonl"

    @property
    def evaluation_md(self) -> Path:  # evaluate: the table the web app's Runs page shows
        return self.root / "evaluation.md"

    @property
    def evaluation_csv(self) -> Path:
        return self.root / "evaluation.csv"

    @property
    def eval_generations(self) -> Path:
        return self.root / "eval_generations.jsonl"

    @property
    def comparison_csv(self) -> Path:  # compare: the table of the inference modes
        return self.root / "comparison.csv"

    @property
    def comparison_md(self) -> Path:
        return self.root / "comparison.md"

    @property
    def comparison_generations(self) -> Path:
        return self.root / "comparison_generations.jsonl"

    @property
    def adapter(self) -> Path:  # train: the PEFT adapter with the tokenizer
        return self.root / "adapter"

    @property
    def adapter_config(self) -> Path:  # present once training saved the adapter
        return self.adapter / "adapter_config.json"

    @property
    def pissa_init(
        self,
    ) -> Path:  # lora.init=pissa: the adapter as initialised, for PEFT's conversion on save
        return self.root / "pissa_init"

    @property
    def merged(self) -> Path:  # merge: a plain Hugging Face model folder
        return self.root / "merged"

    @property
    def merged_tmp(self) -> Path:  # merge writes here, then renames it to merged/
        return self.root / "merged.tmp"

    @property
    def merged_config(self) -> Path:  # present once a merge finished
        return self.merged / "config.json"

    @property
    def merge_report(self) -> Path:
        return self.merged / "merge_report.json"

    @property
    def export(self) -> Path:  # export: one file or folder per export (qlora_lab/exports)
        return self.root / "export"

    @property
    def int8_export(self) -> Path:  # export.format=int8_dynamic, loaded back by inference.mode=int8_dynamic
        return self.export / "int8_dynamic"

    @property
    def export_report(self) -> Path:
        return self.export / "export_report.json"

    @property
    def export_md(self) -> Path:  # export: the table of every export's measurements
        return self.root / "export.md"
