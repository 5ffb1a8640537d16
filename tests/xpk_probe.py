"""Runs xpk's own code on axmini's xpk renderings, in a process of its own (a test helper, not a test).

xpk pins ~60 packages (google-cloud-*, kubernetes, an older protobuf...) that axmini's tests do not need, so its
wheel is put on sys.path alone and the imports its argument parser never calls are stubbed; the parser, its
vocabulary (`--tpu-type` / `--device-type` choices and their slice shapes) and the writer of a workload's main
container (env and command) are xpk's real code. Run as `python xpk_probe.py WHEEL < commands.json` (a list of
`xpk` argument lists); the answer on stdout is {"results": [{"error"} or {"args", "container"}], "systems": {...}}:
per command, xpk's parse error or its parsed arguments and the container YAML it would submit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import io
import json
import os
import sys
import types

# xpk's runtime dependencies that its parser imports but never calls.
STUBBED = {
    "argcomplete",
    "cloud_accelerator_diagnostics",
    "docker",
    "google",
    "jinja2",
    "kubernetes",
    "ruamel",
    "setuptools_scm",
    "tabulate",
}


class _Stub(type):
    """A class whose every attribute is another stub class (usable in annotations, as a base and as a callable)."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(name, (), {})

    def __call__(cls, *args: object, **kwargs: object) -> type:
        return cls


class _StubModule(types.ModuleType):
    __path__: list[str] = []  # a package, so that submodules import too

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: provides a stub only for a listed package that is not installed."""

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _run_xpk(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, object]:
    """What xpk makes of `argv`: its usage error, or its parsed arguments and the main container it would submit."""
    from xpk.core.docker_container import get_main_container
    from xpk.core.docker_resources import parse_env_config
    from xpk.core.system_characteristics import AcceleratorTypeToAcceleratorCharacteristics, get_system_characteristics

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            return {"error": stderr.getvalue().strip().splitlines()[-1]}
        parsed = {key: value for key, value in vars(args).items() if isinstance(value, (str, int, list, type(None)))}
        parse_env_config(args, None)
        system, _ = get_system_characteristics(args)
        resource_type = AcceleratorTypeToAcceleratorCharacteristics[system.accelerator_type].resource_type
        container = get_main_container(args, system, args.docker_image, resource_type, parallel_containers=1)
    return {"args": parsed, "container": container}


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    sys.meta_path.append(_StubFinder())
    os.environ["XPK_VERSION_OVERRIDE"] = "probe"  # xpk asks setuptools_scm for its version at import
    from xpk.core.system_characteristics import AcceleratorType, UserFacingNameToSystemCharacteristics
    from xpk.parser.core import set_parser
    from xpk.utils.execution_context import set_context

    set_context(dry_run_value=True, quiet_value=True)  # as `xpk --dry-run`: no cluster or gcloud is asked

    commands = json.load(sys.stdin)
    parser = argparse.ArgumentParser(prog="xpk")
    set_parser(parser)
    systems = {
        name: {
            "kind": system.accelerator_type.name,
            "topology": system.topology,
            "vms_per_slice": system.vms_per_slice,
            "chips_per_vm": system.chips_per_vm,
            "gke_accelerator": system.gke_accelerator,
        }
        for name, system in UserFacingNameToSystemCharacteristics.items()
        if system.accelerator_type in (AcceleratorType.TPU, AcceleratorType.GPU)
    }
    json.dump({"results": [_run_xpk(parser, argv) for argv in commands], "systems": systems}, sys.stdout)


if __name__ == "__main__":
    main()
