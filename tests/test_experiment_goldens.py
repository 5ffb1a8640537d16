"""Every registered experiment's config text is checked in (refresh with `pytest --update-golden`, review the diff)."""

import pathlib

import pytest
from golden_files import check_golden

from axmini import experiments

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden" / "experiments"


@pytest.mark.parametrize("name", experiments.names())
def test_experiment_config_matches_golden(name, update_golden):
    check_golden(GOLDEN_DIR / f"{name}.txt", experiments.get(name).debug_string(), update=update_golden)


def test_every_golden_file_has_an_experiment():
    stale = sorted({p.stem for p in GOLDEN_DIR.glob("*.txt")} - set(experiments.names()))
    assert not stale, f"golden files without an experiment (delete them): {stale}"
