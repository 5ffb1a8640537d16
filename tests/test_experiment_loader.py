"""Experiments from anywhere: a built-in name, a function of a file outside sys.path, a function of a module path;
every reference that leads nowhere is an ExperimentError naming the file or module; no top-level `experiments`
package is installed, while the built-in experiments are all still listed."""

import ast
import importlib.metadata
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from axmini import experiment_loader, experiments
from axmini.experiment_loader import ExperimentError, ExperimentRef
from axmini.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

EXPERIMENT_FILE = """
from axmini.experiments.lm import tiny
from {helper} import MAX_STEP  # A file beside the experiment file: importable as a script's neighbour would be.


def short():
    return tiny().set(max_step=MAX_STEP)


def needs_arguments(steps):
    return tiny().set(max_step=steps)


def not_a_config():
    return {{"max_step": 3}}


def a_model_config():
    return tiny().model


def broken():
    raise RuntimeError("the user's own bug")


NOT_CALLABLE = 3
"""


def write_experiment_file(directory: Path) -> Path:
    """An experiment file (and a helper module beside it) under unique names, so modules never collide."""
    tag = uuid.uuid4().hex[:8]
    helper = f"helper_{tag}"
    (directory / f"{helper}.py").write_text("MAX_STEP = 7\n")
    path = directory / f"exps_{tag}.py"
    path.write_text(EXPERIMENT_FILE.format(helper=helper))
    return path


def test_parse_tells_names_files_and_modules_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert experiment_loader.parse("tiny") == ExperimentRef("tiny")
    assert experiment_loader.parse("my/exps.py:small") == ExperimentRef("small", file=str(tmp_path / "my/exps.py"))
    assert experiment_loader.parse("exps.py:small").file == str(tmp_path / "exps.py")
    assert experiment_loader.parse("pkg.exps:small") == ExperimentRef("small", module="pkg.exps")
    ref = experiment_loader.parse("my/exps.py:small")
    assert experiment_loader.parse(str(ref)) == ref  # The canonical text parses back from anywhere.
    for text, message in [
        ("exps.py", "name the function too"),
        ("exps.py:1x", "is not a function name"),
        ("pkg..exps:f", "neither a .py file nor a module path"),
        ("", "the experiment is empty"),
    ]:
        with pytest.raises(ExperimentError, match=message):
            experiment_loader.parse(text)


def test_a_function_of_a_file_outside_sys_path_loads_with_its_neighbours(tmp_path, user_modules):
    path = write_experiment_file(tmp_path)
    assert str(tmp_path) not in sys.path
    cfg = experiment_loader.load(f"{path}:short")
    assert Trainer.matches(cfg) and cfg.max_step == 7
    assert experiment_loader.load(f"{path}:short") is not cfg  # A fresh config each time, from one import.


def test_a_function_of_a_module_path_loads_from_the_current_directory(tmp_path, monkeypatch, user_modules):
    package = tmp_path / f"project_{uuid.uuid4().hex[:8]}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_experiment_file(package).rename(package / "exps.py")
    (package / "exps.py").write_text((package / "exps.py").read_text().replace("from helper_", "from .helper_"))
    monkeypatch.chdir(tmp_path)
    assert experiment_loader.load(f"{package.name}.exps:short").max_step == 7


def test_a_built_in_name_loads_from_the_registry():
    assert experiment_loader.load("tiny").debug_string() == experiments.get("tiny").debug_string()


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("nope", "has no function 'nope'"),
        ("shrot", "did you mean 'short'"),
        ("NOT_CALLABLE", "it is not callable"),
        ("needs_arguments", "needs arguments (steps)"),
        ("not_a_config", "returned dict {'max_step': 3}, not a trainer config"),
        ("a_model_config", "returned a Decoder.Config building Decoder, not a trainer config"),
    ],
)
def test_a_reference_that_leads_nowhere_is_one_line_naming_the_file(tmp_path, user_modules, function, message):
    path = write_experiment_file(tmp_path)
    with pytest.raises(ExperimentError) as error:
        experiment_loader.load(f"{path}:{function}")
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_files_modules_and_names_are_refused_by_name(tmp_path, user_modules):
    with pytest.raises(ExperimentError, match=f"no such file {tmp_path / 'missing.py'}"):
        experiment_loader.load(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(ExperimentError, match="no module named 'no_such_package_xyz'"):
        experiment_loader.load("no_such_package_xyz.exps:f")
    with pytest.raises(ExperimentError, match="unknown experiment 'tinny'; did you mean 'tiny'"):
        experiment_loader.load("tinny")
    clash = tmp_path / "json.py"  # Its module name is taken by the standard library's json.
    clash.write_text("def f(): pass\n")
    with pytest.raises(ExperimentError, match="module name 'json' is already taken"):
        experiment_loader.load(f"{clash}:f")


def test_the_users_own_errors_keep_their_traceback(tmp_path, user_modules):
    path = write_experiment_file(tmp_path)
    with pytest.raises(RuntimeError, match="the user's own bug"):
        experiment_loader.load(f"{path}:broken")
    bad = tmp_path / f"syntax_{uuid.uuid4().hex[:8]}.py"
    bad.write_text("def f(:\n")
    with pytest.raises(SyntaxError):
        experiment_loader.load(f"{bad}:f")
    assert bad.stem not in sys.modules  # A failed import leaves no half-made module behind.


def installed_axmini() -> list[str]:
    """The files of the axmini distribution installed where the tests run ([] when there is none)."""
    try:
        dist = importlib.metadata.distribution("axmini")
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(str(dist.locate_file(f)) for f in dist.files or () if dist.locate_file(f).exists())


def test_pip_install_puts_no_top_level_experiments_package_and_lists_every_built_in(tmp_path):
    """`pip install -e .` into a fresh environment (offline: no dependencies, no build isolation; the dependencies
    are then given as plain paths, so no other editable install's import hooks come along)."""
    installed = installed_axmini()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # -I: leave the axmini installed where the tests run alone (pip would uninstall it first).
    pip = [sys.executable, "-m", "pip", "install", "-I", "-q", "--disable-pip-version-check", "--no-deps", "--no-index"]
    subprocess.run([*pip, "--no-build-isolation", "--prefix", str(venv), "-e", str(REPO)], check=True, timeout=300)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    finder = next(site_packages.glob("__editable__*finder.py")).read_text()
    # setuptools writes `MAPPING = {...}` or, since 69, `MAPPING: dict[str, str] = {...}`.
    (line,) = [line for line in finder.splitlines() if line.startswith("MAPPING")]
    mapping = ast.literal_eval(line.split("= ", 1)[1])
    assert mapping == {"axmini": str(REPO / "axmini")}  # The only top-level package installed.
    dependencies = [p for p in sys.path if p.endswith("site-packages")]
    (site_packages / "dependencies.pth").write_text("\n".join(dependencies) + "\n")
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    imported = subprocess.run(
        [python, "-c", "import experiments"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert imported.returncode == 1 and "No module named 'experiments'" in imported.stderr
    listed = subprocess.run(
        [python, "-m", "axmini.cli", "configs", "list"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == experiments.names()
    assert installed_axmini() == installed  # The environment the tests run in keeps its axmini.


def test_the_modularity_sweep_takes_experiments_of_the_users_own(tmp_path, user_modules):
    from axmini.tools.families import experiment_family

    path = write_experiment_file(tmp_path)
    family = experiment_family([f"{path}:short"])
    labels = [label for label, _ in family.models]
    assert f"{path}:short" in labels and set(experiments.names()) <= set(labels)
    assert dict(family.models)[f"{path}:short"]().max_step == 7
    assert family.note.startswith(f"every built-in experiment and {path}:short")
