"""Every value of a growing enum has its registry entry (one file each), filed under its own value; the schema
stays a plain module."""

from __future__ import annotations

import pytest

from qlora_lab.config import DataFormat, ExportFormat, InferenceMode
from qlora_lab.data_formats import FORMATS
from qlora_lab.exports import EXPORTS
from qlora_lab.inference_modes import MODES


@pytest.mark.parametrize(
    ("enum", "registry", "key"),
    [(DataFormat, FORMATS, "format"), (ExportFormat, EXPORTS, "format"), (InferenceMode, MODES, "mode")],
)
def test_every_enum_value_has_a_registry_entry(enum, registry, key):
    chosen = {member for member in enum if member.value != "auto"}  # auto resolves to one of the others
    assert set(registry) == chosen
    for member, entry in registry.items():
        assert getattr(entry, key) is member
        assert entry.doc.strip()


def test_the_schema_imports_no_torch_and_no_transformers():
    import subprocess
    import sys

    code = (
        "import sys, qlora_lab.config; print(sorted(m for m in ('torch', 'transformers') if m in "
        "sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
