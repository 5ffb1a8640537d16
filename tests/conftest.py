"""Test setup: 8 simulated CPU devices, so sharding is really exercised, and the golden update switch."""

import os
import sys
from collections.abc import Iterator

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest

assert jax.device_count() == 8, "tests expect 8 simulated CPU devices; jax was initialized before conftest"
# Tests compile hundreds of small programs and run each a few times: XLA's optimizations cost far more
# compile time than they save (about 3x overall on 2 cores). Numerics are unaffected within test tolerances.
jax.config.update("jax_disable_most_optimizations", True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files instead of comparing")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden")) or os.environ.get("UPDATE_GOLDEN") == "1"


@pytest.fixture
def user_modules(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    """Experiment files and modules a test writes under its tmp_path are forgotten after it (sys.path, sys.modules)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
