"""Export formats (export.format, export.targets): one file per format, each holding one ExportSpec: its doc
line, its variants (gguf's types), where it lands in a run, its checks, how it is written and how it is loaded
back. The export stage (qlora_lab/pipelines/export.py) only loops over the chosen ones. A new format: a file
here, an ExportFormat member in config.py, and its EXPORT added to EXPORTS below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, ExportConfig, ExportFormat


@dataclass(frozen=True)
class ExportSpec:
    format: ExportFormat
    doc: str
    # (run folder, variant) -> the file or folder the export is written to
    path: Callable[[Path, str | None], Path]
    # (merged folder, target path, variant, model name, provenance) -> facts about the file written
    write: Callable[..., dict]
    # (path, cfg) -> (model on the CPU, tokenizer)
    load: Callable[..., tuple]
    bytes_per_weight: Callable[[str | None], float]  # for the disk space an export needs
    variants: tuple[str, ...] = ()  # written `format:variant` in export.targets; () = the format takes none
    # (cfg, run folder, model config.json dict, adapter folder): what can be checked before any merge or write
    check: Callable[..., None] | None = None
    own_tokenizer: bool = False  # the file carries its tokenizer: measured against the run's

    def name(self, variant: str | None) -> str:
        return f"{self.format.value}-{variant}" if variant else self.format.value


def _exports() -> dict[ExportFormat, ExportSpec]:
    from . import gguf, int8_dynamic

    return {spec.format: spec for spec in (gguf.EXPORT, int8_dynamic.EXPORT)}


EXPORTS = _exports()


def export_targets(e: ExportConfig) -> list[tuple[ExportSpec, str | None]]:
    """[(format, variant or None)], from export.targets (`gguf:q8_0`, `int8_dynamic`) or format/gguf_type."""
    if not e.targets:
        spec = EXPORTS[e.format]
        return [(spec, e.gguf_type.value if spec.variants else None)]
    out = []
    for target in e.targets:
        fmt, _, variant = str(target).partition(":")
        spec = next((s for s in EXPORTS.values() if s.format.value == fmt), None)
        if spec is None or (variant not in spec.variants if spec.variants else variant):
            forms = " or ".join(
                f"{s.format.value}:TYPE with TYPE one of {', '.join(s.variants)}"
                if s.variants
                else s.format.value
                for s in sorted(EXPORTS.values(), key=lambda s: bool(s.variants))
            )
            raise ConfigError(f"export.targets has {target!r}; write {forms}.")
        out.append((spec, variant or None))
    return list(dict.fromkeys(out))
