"""Fuzzing the real config tree of `tiny`: hundreds of generated bad overrides (typos, wrong types, enums, values out
of range, zero and negative sizes, child dims that disagree with their parent, dict entries, injection text) must
each be refused by `axmini train` in exactly one line on stderr, exit code 2, no traceback, nothing written."""

import enum
import random

from axmini import experiments
from axmini.cli import main, train
from axmini.config import REQUIRED

# What each field accepts, for the fields whose bad values depend on their meaning (the rest: by type).
POSITIVE = {"vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "hidden_dim", "global_batch_size"}
POSITIVE |= {"sequence_length", "every_n_steps", "save_every_n_steps", "keep_last_n", "microbatches"}
POSITIVE |= {"log_every_n_steps", "theta", "eps", "peak_lr", "max_grad_norm"}
NON_NEGATIVE = {"z_loss_weight", "warmup_steps", "eps_root", "weight_decay", "max_step", "scale", "stddev", "seed"}
BELOW_ONE = {"b1", "b2"}  # [0, 1)
FRACTION = {"final_lr_ratio", "rotary_fraction"}  # [0, 1]
# Dims a parent fills in its child (tiny: vocab 2048, width 128, 4 heads of 32): any other value disagrees.
FILLED_DIMS = {"num_embeddings", "input_dim", "output_dim", "head_dim", "num_heads", "num_kv_heads"}
DISAGREEING = ["5", "7", "63", "96", "1000"]
INJECTIONS = [
    "$(touch {marker})",
    "`touch {marker}`",
    "__import__('os').system('touch {marker}')",
    "'; import os; os.system('touch {marker}') #",
    "{{7*7}}",
    "a\nb",
    "\x1b[2Jcleared",
    "\x00",
    "%s%s%n",
    "\udcff\udcfe",
    "A" * 5000,
]


def tiny_leaves() -> dict[str, object]:
    return experiments.get("tiny").to_flat_dict()


def typos(path: str, rng: random.Random) -> list[str]:
    parts = path.split(".")
    i = rng.randrange(len(parts))
    word = parts[i].split("[")[0]
    rest = parts[i][len(word) :]
    k = rng.randrange(len(word))
    variants = {word[:k] + word[k + 1 :], word[:k] + "x" + word[k:], word.upper(), word + "s", word.replace("_", "")}
    return [".".join([*parts[:i], v + rest, *parts[i + 1 :]]) for v in variants if v and v != word]


def by_meaning(path: str, value: object) -> list[str]:
    """Bad values for a field by what it means: out of range, zero and negative sizes, disagreeing child dims."""
    name = path.rsplit(".", 1)[-1]
    huge = [str(2**70)] if isinstance(value, int) else ["1e400"]  # Past int64; past float64 (inf).
    if value is REQUIRED and name in FILLED_DIMS:
        return DISAGREEING + ["0", "-1"]
    if name in POSITIVE:
        return ["0", "-1", "-7", "nan" if isinstance(value, float) else "1e-3", *huge] + (
            ["inf", "-2.5"] if isinstance(value, float) else []
        )
    if name in NON_NEGATIVE:
        return ["-1", "-0.5" if isinstance(value, float) else "-9", "nan", *huge]
    if name in BELOW_ONE:
        return ["1", "1.5", "-0.1", "nan"]
    if name in FRACTION:
        return ["1.5", "-0.5", "nan"]
    if name == "pad_id":
        return ["-1", "2048", "99999"]
    if name == "total_steps":
        return ["0", "-5"]
    if name == "seed":
        return [str(2**32), "-1"]
    return []


def by_type(value: object) -> list[str]:
    """Values of another type than the field's."""
    if isinstance(value, bool):
        return ["maybe", "2", "[True]", "0.5"]
    if isinstance(value, enum.Enum):
        return ["BOGUS", f"{type(value).__name__}.BOGUS", "3", "[1]"]
    if isinstance(value, int):
        return ["abc", "1.5", "[1]", "{'a': 1}", "True"]
    if isinstance(value, float):
        return ["abc", "[1.0]", "'0.1'", "{}"]
    if isinstance(value, list):
        return ["7", "'text'"]
    return []


def bad_overrides(marker: str, not_a_dir: str) -> list[str]:
    rng = random.Random(2024)
    leaves = tiny_leaves()
    cases = []
    for path, value in leaves.items():
        if path == "dir" or path.endswith(".klass") or path.endswith(".fn"):
            continue
        cases += [f"{typo}=1" for typo in typos(path, rng) if typo not in leaves]
        cases += [f"{path}={v}" for v in by_meaning(path, value) + by_type(value)]
    # Semantics of text fields: names that do not exist, directories that cannot be written.
    cases += [
        "input.task=no_such_task",
        "input.split=bogus",
        "evaluator.input.split=tain",
        "input.num_epochs=0",
        "input.task_modules=['no_such_module_for_axmini']",
        "model.stack.layer.norm.axis_name=embd",
        "model.output_norm.axis_name=vocabulary",
        "mesh_selector=tpu-v9-1",
        "mesh_selector=cpu-8",
        "mesh_rules[0].pattern=gpu",
        "mesh_rules[0].pattern=(",
        f"checkpointer.dir={not_a_dir}/checkpoints",
        f"summary_writer.dir={not_a_dir}",
        "dir=/tmp/elsewhere",
        "model.dtype=bar",
        "model.dtype=int32",
        "model.param_dtype=bogus",
        "learner.optimizer.mu_dtype=bogus",
        "learner.optimizer.learning_rate=0.1",
        "learner.optimizer.mask=[]",
        "learner.no_decay_patterns=['(']",
        "learner.learning_rate=-0.1",
        "learner.learning_rate=0",
        "learner.learning_rate.peak_lr=1e400",
        "model.param_init.scale=0.5",
        "model.stack.param_init.scale=2.0",
        "model.stack.layer.norm.param_init.scale=0.0",
        "model.stack.layer.self_attention.input_linear.param_init.scale=3.0",
        "microbatches=3",
        "input.global_batch_size=12",
        "evaluator.input.global_batch_size=4",
        "model.stack.layer.self_attention.num_heads=3",
        "model.stack.layer.self_attention.num_kv_heads=3",
        "model.vocab_size=100",
        "max_step=1e9",
        "max_step",
        "=3",
        "model..dim=3",
        "model.dim[0]=3",
        "mesh_rules[9].pattern=cpu",
        "mesh_rules[0].mesh_shape.fsdp=abc",
        "mesh_rules[0].mesh_shape.fsdp=0",
        "mesh_rules[0].mesh_shape.fsdp=-2",
        "mesh_rules[0].mesh_shape.fsdp=3",
        "mesh_rules[0].mesh_shape.fsdp=1.5",
        "mesh_rules[0].mesh_shape.bogus=2",
        "mesh_rules[0].mesh_shape={'fsdp': 'x'}",
        "mesh_rules[0].mesh_shape={'pipeline': 8}",
        "mesh_rules[1].mesh_shape.fsdp=abc",
    ]
    text_fields = ["input.task", "input.split", "model.stack.layer.norm.axis_name", "mesh_selector", "model.dim"]
    cases += [f"{field}={text.format(marker=marker)}" for field in text_fields for text in INJECTIONS]
    return list(dict.fromkeys(cases))


def test_bad_overrides_of_the_real_config_tree_fail_in_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "injected"
    (tmp_path / "file").write_text("a file, not a directory")
    cases = bad_overrides(str(marker), str(tmp_path / "file"))
    assert len(cases) >= 500
    prepare = train.prepare

    def prepare_without_running(args):  # An override that passes must not start training: it fails the test.
        prepare(args)
        return lambda: 0

    monkeypatch.setattr(train, "prepare", prepare_without_running)
    run = tmp_path / "run"
    failures = []
    for override in cases:
        try:
            code = main(["train", "--config=tiny", f"--trainer_dir={run}", "--sample_prompt=", "--set", override])
        except Exception as e:  # A traceback: counted, so that one run shows every failing case.
            code = f"{type(e).__name__}: {str(e)[:200]}"
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        if code != 2 or len(lines) != 1 or "Traceback" in captured.err or run.exists():
            failures.append(f"{override!r}: exit {code}, {len(lines)} lines: {captured.err[-300:]!r}")
    rate = 1 - len(failures) / len(cases)
    assert not marker.exists()
    assert not failures, f"{len(failures)} of {len(cases)} not refused cleanly ({rate:.1%} ok):\n" + "\n".join(failures)
