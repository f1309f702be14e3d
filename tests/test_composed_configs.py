"""Composed configs stay what they were: the default, every experiment and every group option.

tests/fixtures/composed_configs.json holds each one's job config (interpolations unresolved, Enums as strings)
and its sweep settings. After a deliberate change, rewrite it with `python -m tests.test_composed_configs` and
review the diff.
"""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .conftest import CONF

FIXTURE = CONF.parent / "tests" / "fixtures" / "composed_configs.json"
# Groups outside the root defaults list, added with +GROUP=OPTION (conf/qlora_variant: the qlora_variants
# sweep).
ADDED_GROUPS = ["qlora_variant"]


def cases() -> list[str]:
    """ "" (the plain default), +experiment=NAME for every experiment, GROUP=OPTION for every option of every
    group."""
    out = [""] + [f"+experiment={p.stem}" for p in sorted((CONF / "experiment").glob("*.yaml"))]
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra")):
        added = "+" if group.name in ADDED_GROUPS else ""
        out += [f"{added}{group.name}={p.stem}" for p in sorted(group.glob("*.yaml"))]
    return out


def composed(override: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=[override] if override else [], return_hydra_config=True
        )
    job = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    hydra = job.pop("hydra")
    return {
        "job": job,
        "sweeper_params": hydra["sweeper"].get("params"),
        "launcher": hydra["launcher"]["_target_"],
    }


@pytest.mark.parametrize("override", json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else [])
def test_composed_config_is_unchanged(override):
    recorded = json.loads(FIXTURE.read_text())[override]
    assert composed(override) == recorded


def test_fixture_covers_every_experiment_and_option():
    assert set(cases()) <= set(json.loads(FIXTURE.read_text()))


if __name__ == "__main__":
    from qlora_lab.config import register

    register()
    FIXTURE.write_text(
        json.dumps({case: composed(case) for case in cases()}, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {FIXTURE}")
