"""`axmini launch local|tpu|gpu`: run training on N local processes, or render and submit a TPU/GPU cluster job.

    axmini launch local --num_processes=2 --devices_per_process=4 -- --config=NAME ...
    axmini launch tpu --name=run1 --instance_type=tpu-v5p-256 --num_slices=2 --image=IMG \\
        --renderer=jobset --dry_run -- --config=NAME ...

Arguments after `--` go to `axmini train` (a leading `train` or `axmini train` is taken as said once, not twice);
`--mesh_selector=<instance type>` is added for cluster runs. `--dry_run` prints exactly what would be submitted and
needs neither credentials nor cloud tools. Without it the rendering is submitted with `kubectl apply -f -`, `xpk` or
`bash` (running the gcloud script). Exit codes: 0 on success, 2 for a bad spec or a missing tool (one line each),
otherwise the failing process's or tool's code.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence

from axmini.config import ConfigError
from axmini.launch.local import run_local
from axmini.launch.render import jobset_yaml, render, xpk_argv
from axmini.launch.spec import PRIORITIES, PROVISIONINGS, RENDERERS, TRAIN_PREFIX, LaunchSpec, validate

USAGE_ERROR = 2
_TOOLS = {"jobset": "kubectl", "xpk": "xpk", "gcloud": "gcloud"}


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axmini launch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="target", required=True)

    local = sub.add_parser("local", help="N processes on this machine (simulated CPU devices)")
    local.add_argument("--num_processes", type=int, default=2)
    local.add_argument("--devices_per_process", type=int, default=1, help="simulated CPU devices per process")
    local.add_argument("--grace_s", type=float, default=5.0, help="SIGTERM-to-SIGKILL delay when stopping")
    local.add_argument("--timeout_s", type=float, default=None, help="stop everything after this many seconds")

    for target in ("tpu", "gpu"):
        cluster = sub.add_parser(target, help=f"render / submit a {target.upper()} job")
        cluster.add_argument("--renderer", choices=RENDERERS, default="jobset")
        cluster.add_argument("--dry_run", action="store_true", help="print what would be submitted and exit")
        cluster.add_argument("--name", required=True)
        cluster.add_argument("--instance_type", required=True)
        cluster.add_argument("--num_slices", type=int, default=1, help="TPU slices or GPU hosts")
        cluster.add_argument("--image", default="")
        cluster.add_argument("--env", type=_key_value, action="append", default=[], metavar="KEY=VALUE")
        cluster.add_argument("--priority", choices=PRIORITIES, default="medium")
        cluster.add_argument("--queue", default="")
        cluster.add_argument("--max_restarts", type=int, default=0)
        cluster.add_argument("--provisioning", choices=PROVISIONINGS, default="on-demand")
        for flag in ("reservation", "project", "zone", "cluster", "runtime_version"):
            cluster.add_argument(f"--{flag}", default="")
        cluster.add_argument("--namespace", default="default")
    return parser


def _split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own arguments, the arguments of `axmini train`): those after `--`, without a leading
    `train` / `axmini train` that would otherwise be doubled."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    train_args = argv[i + 1 :]
    for prefix in (list(TRAIN_PREFIX), list(TRAIN_PREFIX[1:])):
        if train_args[: len(prefix)] == prefix:
            return argv[:i], train_args[len(prefix) :]
    return argv[:i], train_args


def _spec_from_args(args: argparse.Namespace, train_args: list[str]) -> LaunchSpec:
    fields = ("name", "instance_type", "num_slices", "image", "priority", "queue", "max_restarts", "provisioning")
    fields += ("reservation", "project", "zone", "cluster", "namespace", "runtime_version")
    return LaunchSpec(**{f: getattr(args, f) for f in fields}, env=dict(args.env), command=[*TRAIN_PREFIX, *train_args])


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _submit(spec: LaunchSpec, renderer: str) -> int:
    tool = _TOOLS[renderer]
    if shutil.which(tool) is None:
        return _fail(f"`{tool}` is not installed or not on PATH; install it, or use --dry_run to print the {renderer}")
    if renderer == "jobset":
        return subprocess.run([tool, "apply", "-f", "-"], input=jobset_yaml(spec), text=True).returncode
    if renderer == "xpk":
        return subprocess.run(xpk_argv(spec)).returncode
    if shutil.which("bash") is None:
        return _fail("`bash` is needed to run the gcloud script; use --dry_run to print it")
    return subprocess.run(["bash", "-s"], input=render(spec, renderer), text=True).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `axmini launch` (argv: the arguments after `launch`)."""
    own_args, train_args = _split_train_args(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(own_args)
    except SystemExit as e:  # argparse has printed the usage error (or the help)
        return int(e.code or 0)
    if args.target == "local":
        try:
            command = [sys.executable, "-m", "axmini.cli", "train", *train_args]
            return run_local(
                command,
                num_processes=args.num_processes,
                devices_per_process=args.devices_per_process,
                grace_s=args.grace_s,
                timeout_s=args.timeout_s,
            )
        except ValueError as e:
            return _fail(str(e))
    try:
        spec = _spec_from_args(args, train_args)
    except ConfigError as e:
        return _fail(str(e))
    errors = validate(spec, args.renderer)
    platform = args.instance_type.split("-")[0]
    if platform in ("tpu", "gpu") and platform != args.target:
        errors.append(f"--instance_type={args.instance_type!r} is a {platform.upper()} type; use `launch {platform}`")
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    if args.dry_run:
        sys.stdout.write(render(spec, args.renderer).rstrip("\n") + "\n")
        return 0
    return _submit(spec, args.renderer)
