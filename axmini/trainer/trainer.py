"""The trainer: builds model, learner, input, evaluator, checkpointer and summaries on a mesh, and trains.

The trainer builds a *finalized* config only (`axmini.trainer.finalize.finalize`: the instance type's mesh rule
applied, the dirs and max_step its children need filled in) and never rewrites it, so its config.txt is what
`axmini configs show NAME --mesh_selector=TYPE` prints. Hardware enters through that mesh rule only: its mesh shape
and logical-axis rules place parameters, optimizer state and activations on the mesh. The model is initialized
directly sharded (never whole on one device).

The train state is a pytree `{"step", "params", "rest", "opt_state"}` (`rest`: the model's non-parameter
variables, e.g. RNG counters). The train step is one jitted pure function with explicit in/out shardings:
the model is merged from its graph definition and the state inside the step (nnx.split/merge at the jit
boundary). With `microbatches > 1`, gradients are accumulated over a `lax.scan`. The loss is the model's
loss plus every AuxLoss the model sows. Batches are indexed by step, so a restored checkpoint resumes the
data exactly where the uninterrupted run would be.

A step whose loss, gradient norm or update norm is NaN or infinite never changes the parameters: the step keeps
the state it was given (`non_finite_loss` says whether the run then stops, with a checkpoint of that last good
state, or moves on to the next batch). A non-finite loss on the first step after a restore marks the checkpoint
as corrupt: it is moved aside and the one before it is restored.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from axmini.config import (
    REQUIRED,
    Configurable,
    ConfigValueError,
    Required,
    check_non_negative,
    check_positive,
    check_range,
    config_path,
    optional,
    validate,
)
from axmini.mesh_rules import MeshRule, default_mesh_rules, instance_type, make_mesh, memory_bytes
from axmini.module import Layer, build_abstract, capture_aux, count_params, logical_to_spec, sharding_context
from axmini.trainer.checkpointer import Checkpointer, NoRestorableCheckpointError, config_record
from axmini.trainer.evaluator import Evaluator, loss_sums
from axmini.trainer.input import BATCH_KEYS, Batch, Input
from axmini.trainer.learner import Learner
from axmini.trainer.summary import ProgressBar, SummaryWriter, flops_per_token, mfu
from axmini.trainer.warm_start import check_init_from, has_checkpoint, warm_started

logger = logging.getLogger(__name__)
State = dict[str, Any]
BATCH_AXES = ("batch", "length")


class NonFiniteLoss(enum.Enum):
    """What the run does after a step whose loss or gradient norm is NaN or infinite (its update is never applied)."""

    STOP = "stop"  # Checkpoint the state before that step (the last good one) and stop.
    SKIP_UPDATE = "skip_update"  # Drop that step's update and go on with the next batch.


class TrainResult(NamedTuple):
    step: int  # The last completed step.
    losses: dict[int, float]  # Model loss of each step run by this call, by step number (1-based).
    eval_metrics: dict[str, float]  # The last evaluation ({} when none ran).
    preempted: bool  # True when stopped by SIGTERM (after saving a checkpoint).
    state: State  # The final train state.
    non_finite_step: int | None = None  # The step whose non-finite loss stopped the run (NonFiniteLoss.STOP).


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Any) -> Any:
    """A NamedSharding per leaf of `abstract_state` (same structure): a variable's from its logical axes, and
    replicated for plain arrays and for optimizer statistics whose rank differs from their parameter's
    (Adafactor's factored moments)."""
    items = jax.tree.leaves(abstract_state, is_leaf=_is_variable)

    def sharding(item: Any) -> NamedSharding:
        if not _is_variable(item):
            return _replicated(mesh)
        value = item.get_value()
        axes = item.get_metadata().get("axes")
        if axes is None or len(axes) != np.ndim(value):
            return _replicated(mesh)
        return NamedSharding(mesh, logical_to_spec(axes, rules, np.shape(value), mesh))

    # A variable of a frozen parameter's optimizer state (optax masks, e.g. LoRA) holds no array: it gets none.
    shardings = [sharding(item) for item in items if jax.tree.leaves(item)]
    treedef = jax.tree.structure(abstract_state)
    if treedef.num_leaves != len(shardings):
        raise ValueError("train state: every variable must hold exactly one array")
    return jax.tree.unflatten(treedef, shardings)


class Trainer(Configurable):
    """Trains `model` on `input` with `learner` for `max_step` steps; see the module docstring."""

    class Config(Configurable.Config):
        dir: Required[str] = REQUIRED  # The run directory: config, checkpoints, summaries.
        model: Required[Layer.Config] = REQUIRED  # Any layer whose __call__(batch) returns (loss, metrics).
        input: Required[Input.Config] = REQUIRED
        learner: Learner.Config = Learner.default_config()
        evaluator: Evaluator.Config = Evaluator.default_config()
        checkpointer: Checkpointer.Config = Checkpointer.default_config()
        summary_writer: SummaryWriter.Config = SummaryWriter.default_config()
        max_step: Required[int] = REQUIRED
        microbatches: int = 1  # Gradient accumulation: the global batch is split into this many microbatches.
        log_every_n_steps: int = 10
        mesh_rules: list[MeshRule] = default_mesh_rules()
        mesh_selector: str | None = None  # An instance type (cpu, gpu-h100-8, tpu-v5p-256...); None: detect.
        mesh_rule: MeshRule | None = None  # Set by finalize(): the rule of mesh_selector, its modifiers applied.
        seed: int = 0
        progress_bar: bool = True
        # The weights this run starts from when it has no checkpoint of its own (the base model of a fine-tune): a
        # trainer dir, or hf:DIR (a Hugging Face model dir); see axmini/trainer/warm_start.py. None: the initializers.
        init_from: str | None = optional(None)
        non_finite_loss: NonFiniteLoss = optional(NonFiniteLoss.STOP)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_non_negative(cfg, "max_step")
        check_positive(cfg, "microbatches", "log_every_n_steps")
        check_range(cfg, "seed", low=0, high=2**32)  # jax.random.key keeps 32 bits: larger seeds would collide.

    def __init__(self, cfg: Config, *, devices: list[jax.Device] | None = None):
        if cfg.mesh_rule is None or cfg.mesh_selector is None:
            raise ConfigValueError(
                "mesh_rule=None: the Trainer builds a finalized config only; build "
                "axmini.trainer.finalize.finalize(cfg, instance_type) instead (what `axmini train` runs)"
            )
        validate(cfg)  # As finalize does: a value changed since is refused too, before anything is built.
        super().__init__(cfg)
        cfg = self.config
        self.instance = instance_type(cfg.mesh_selector)
        self.mesh_rule: MeshRule = cfg.mesh_rule
        self.mesh = make_mesh(self.mesh_rule, devices)
        self.rules = tuple(tuple(rule) for rule in self.mesh_rule.logical_axis_rules)
        self._check(cfg)
        if cfg.init_from is not None and not has_checkpoint(cfg.checkpointer.dir):  # Resuming never reads it.
            check_init_from(cfg.init_from, cfg.model)
        self.input: Input = cfg.input.instantiate()
        self.evaluator: Evaluator = cfg.evaluator.instantiate()
        self.learner: Learner = cfg.learner.instantiate()
        self._check_vocab(cfg)

        abstract_model = build_abstract(cfg.model, cfg.seed)
        self.num_params = count_params(abstract_model)
        self.flops_per_token = flops_per_token(abstract_model, cfg.input.sequence_length)  # Attention included.
        self._graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
        self.abstract_state = jax.eval_shape(self._init_state)
        self.state_shardings = state_shardings(self.abstract_state, self.mesh, self.rules)
        self._check_state(cfg)
        self.batch_sharding = self._batch_sharding(cfg.input)
        self._compiled: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------
    # Building.

    def _check(self, cfg: Config) -> None:
        spec = logical_to_spec(BATCH_AXES, self.rules)
        batch_axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
        shards = math.prod(self.mesh.shape[a] for a in batch_axes if a in self.mesh.shape)
        where = f"batch shards (mesh {dict(self.mesh.shape)}, mesh rule {self.mesh_rule.pattern!r})"
        batch = cfg.input.global_batch_size
        if batch % (shards * cfg.microbatches):
            raise ConfigValueError(
                f"{config_path(cfg.input, 'global_batch_size')}={batch} must be a multiple of "
                f"{config_path(cfg, 'microbatches')}={cfg.microbatches} x {shards} {where}"
            )
        eval_input = cfg.evaluator.input
        if eval_input is not None and eval_input.global_batch_size % shards:
            raise ConfigValueError(
                f"{config_path(eval_input, 'global_batch_size')}={eval_input.global_batch_size} must be a multiple "
                f"of {shards} {where}"
            )

    def _check_vocab(self, cfg: Config) -> None:
        model_vocab = getattr(cfg.model, "vocab_size", None)
        input_vocab = self.input.vocab_size()
        if isinstance(model_vocab, int) and input_vocab is not None and input_vocab > model_vocab:
            vocab_size = config_path(cfg.model, "vocab_size")
            raise ConfigValueError(
                f"{vocab_size}={model_vocab} is smaller than the input's vocabulary ({input_vocab} ids, "
                f"{config_path(cfg.input, 'task')} or {config_path(cfg.input, 'vocab_size')}); "
                f"set {vocab_size} >= {input_vocab}"
            )

    def _check_state(self, cfg: Config) -> None:
        """Refuses a parameter axis that no mesh rule names (a typo such as `embd` would silently replicate it), and
        a train state larger than the memory of this process's devices."""
        known = {name for rule in cfg.mesh_rules for name, _ in rule.logical_axis_rules}
        flat = jax.tree_util.tree_flatten_with_path(self.abstract_state["params"], is_leaf=_is_variable)[0]
        for path, variable in flat:
            unknown = [a for a in variable.get_metadata().get("axes") or () if a is not None and a not in known]
            if unknown:
                raise ConfigValueError(
                    f"parameter {jax.tree_util.keystr(path)} has logical axis {unknown[0]!r}, which no mesh rule "
                    f"names (known: {', '.join(sorted(known))}); fix the axis name in its layer's config"
                )
        shardings = jax.tree.leaves(self.state_shardings)
        needed = sum(
            math.prod(s.shard_shape(a.shape)) * getattr(a.dtype, "itemsize", 8) * len(s.addressable_devices)
            for a, s in zip(jax.tree.leaves(self.abstract_state), shardings)
        )
        devices = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        available = memory_bytes(devices)
        if needed > available:
            raise ConfigValueError(
                f"the train state (parameters and optimizer state) of {config_path(cfg, 'model')} needs "
                f"{needed / 2**30:.4g} GiB on this process's devices, more than their {available / 2**30:.4g} GiB; "
                "make the model smaller or use more devices"
            )

    @staticmethod
    def _batch_shape(input_cfg: Input.Config) -> tuple[int, int]:
        return (input_cfg.global_batch_size, input_cfg.sequence_length)

    def _batch_sharding(self, input_cfg: Input.Config) -> NamedSharding:
        """Batches are sharded over the mesh axes of the logical `batch` axis (rows) and `length`."""
        return NamedSharding(
            self.mesh, logical_to_spec(BATCH_AXES, self.rules, self._batch_shape(input_cfg), self.mesh)
        )

    # ------------------------------------------------------------------------------------------------
    # Pure functions of the state.

    def _init_state(self) -> State:
        model = self.config.model.instantiate(rngs=nnx.Rngs(self.config.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        step = jnp.zeros((), jnp.int32)
        return {"step": step, "params": params, "rest": rest, "opt_state": self.learner.init(params)}

    def _loss(self, params: Any, rest: Any, batch: Batch) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
        model = nnx.merge(self._graphdef, params, rest)
        (loss, metrics), aux_losses, summaries = capture_aux(lambda m, b: m(b), model, batch)
        total = loss + sum(aux_losses.values(), jnp.zeros((), jnp.float32))
        metrics = {
            **metrics,
            "loss": loss,
            "total_loss": total,
            **{f"aux/{k}": v for k, v in aux_losses.items()},
            **{f"summary/{k}": v for k, v in summaries.items() if jnp.ndim(v) == 0},
        }
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return total, (new_rest, metrics)

    def _microbatches(self, batch: Batch) -> Batch:
        """[B, T] -> [M, B/M, T], microbatch m taking rows m, m + M, ... so each keeps the batch sharding."""
        m = self.config.microbatches
        spec = PartitionSpec(None, *self.batch_sharding.spec)

        def split(x: jax.Array) -> jax.Array:
            x = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        return jax.tree.map(split, batch)

    def _train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        params = state["params"]
        if self.config.microbatches == 1:
            (_, (rest, metrics)), grads = grad_fn(params, state["rest"], batch)
        else:

            def accumulate(carry: Any, microbatch: Batch) -> tuple[Any, dict[str, jax.Array]]:
                grads, rest = carry
                (_, (rest, metrics)), g = grad_fn(params, rest, microbatch)
                return (jax.tree.map(jnp.add, grads, g), rest), metrics

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, rest), metrics = jax.lax.scan(accumulate, (zeros, state["rest"]), self._microbatches(batch))
            grads = jax.tree.map(lambda g: g / self.config.microbatches, grads)
            metrics = {k: v.sum() if k == "num_tokens" else v.mean() for k, v in metrics.items()}
        update = self.learner.update(grads, state["opt_state"], params, state["step"])
        new_state = {"step": state["step"] + 1, "params": update.params, "rest": rest, "opt_state": update.opt_state}
        # A non-finite loss or gradient keeps the state it was given: whole (STOP, the last good state to checkpoint)
        # or but for the step (SKIP_UPDATE, the data moves on).
        finite = jnp.all(jnp.isfinite(jnp.stack([metrics["total_loss"], *update.summaries.values()])))
        kept = state if self.config.non_finite_loss is NonFiniteLoss.STOP else {**state, "step": state["step"] + 1}
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
        return new_state, {**metrics, **update.summaries}

    def _eval_step(self, state: State, batch: Batch) -> dict[str, jax.Array]:
        return loss_sums(nnx.merge(self._graphdef, state["params"], state["rest"]), batch)

    # ------------------------------------------------------------------------------------------------
    # Compiled entry points (traced inside the sharding context, so layers' activation hints apply).

    def _compile(self, name: str, fn: Callable[..., Any], batch_input: Input.Config, **jit_kwargs: Any) -> Any:
        if name not in self._compiled:
            sharding = self._batch_sharding(batch_input)
            shape = self._batch_shape(batch_input)
            batch = {
                k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "target_weights" else jnp.int32, sharding=sharding)
                for k in BATCH_KEYS
            }
            jitted = jax.jit(fn, in_shardings=(self.state_shardings, sharding), **jit_kwargs)
            with sharding_context(self.mesh, self.rules):
                self._compiled[name] = jitted.lower(self.abstract_state, batch).compile()
        return self._compiled[name]

    def _train_step_packed(self, state: State, batch: Batch) -> tuple[State, jax.Array]:
        """`_train_step` with its scalar metrics stacked into one float32 vector, so that the host fetches them in one
        transfer instead of one per metric; their names are recorded while tracing."""
        state, metrics = self._train_step(state, batch)
        self._metric_names = tuple(sorted(metrics))
        return state, jnp.stack([jnp.asarray(metrics[name], jnp.float32) for name in self._metric_names])

    def compiled_train_step(self) -> Any:
        """The train step, compiled for this mesh (once): (state, batch) -> (state, metrics as one vector)."""
        return self._compile(
            "train",
            self._train_step_packed,
            self.config.input,
            out_shardings=(self.state_shardings, _replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, float]]:
        """One step on a global batch (see `global_batch`); the input state is donated. Waits for the step (which on
        CPU also avoids the collective hang hazard) and returns its metrics as floats."""
        state, packed = self.compiled_train_step()(state, batch)
        return state, dict(zip(self._metric_names, np.asarray(jax.device_get(packed)).tolist()))

    def eval_step(self, state: State, batch: Batch) -> dict[str, jax.Array]:
        eval_input = self.config.evaluator.input
        assert eval_input is not None
        compiled = self._compile("eval", self._eval_step, eval_input, out_shardings=_replicated(self.mesh))
        return compiled(state, batch)

    def global_batch(self, local: Batch, input_cfg: Input.Config | None = None) -> Batch:
        """This process's rows -> global arrays sharded over the batch axes of the mesh."""
        input_cfg = input_cfg or self.config.input
        shape, sharding = self._batch_shape(input_cfg), self._batch_sharding(input_cfg)
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]), shape) for k in BATCH_KEYS}

    # ------------------------------------------------------------------------------------------------
    # State: init, restore, model.

    def init_state(self) -> State:
        """A fresh state, initialized directly sharded (from `init_from`'s parameters when set).

        On CPU the init program is compiled without backend optimization: it runs once, and XLA:CPU spends
        seconds optimizing its random-number code for nothing (values agree to the last float bit or so).
        """
        options = {"xla_backend_optimization_level": 0} if self.mesh.devices.flat[0].platform == "cpu" else None
        with sharding_context(self.mesh, self.rules):
            lowered = jax.jit(self._init_state, out_shardings=self.state_shardings).lower()
        state = lowered.compile(compiler_options=options)()
        return warm_started(self, state) if self.config.init_from is not None else state

    def restore_or_init(self, checkpointer: Checkpointer | None = None, *, from_scratch: bool = False) -> State:
        """The state of the latest checkpoint that restores and verifies, placed on this mesh (corrupt newer ones are
        moved aside), or a fresh state when the directory has no checkpoint. `from_scratch`: a fresh state, with the
        directory's checkpoints moved aside (kept).

        Raises CheckpointMismatchError (the checkpoints were written by another model or config) and
        NoRestorableCheckpointError (none restores): a run that cannot resume never silently starts over."""
        own = checkpointer is None
        checkpointer = checkpointer or self.config.checkpointer.instantiate()
        try:
            if from_scratch:
                checkpointer.set_aside_all("set aside to start from scratch")
                return self.init_state()
            restored = checkpointer.restore_latest(self._placed_abstract_state(), config=self.config.debug_string())
            return restored.state if restored is not None else self.init_state()
        finally:
            if own:
                checkpointer.close()

    def _placed_abstract_state(self) -> Any:
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_shardings
        )

    def _fall_back(self, checkpointer: Checkpointer, step: int, reason: str) -> State:
        """The state of the newest good checkpoint older than `step`, after moving the one at `step` aside."""
        try:
            restored = checkpointer.restore_latest(
                self._placed_abstract_state(), config=self.config.debug_string(), before=step
            )
        except NoRestorableCheckpointError:
            restored = None
        if restored is None:
            raise NoRestorableCheckpointError(
                f"checkpoint step {step} in {checkpointer.config.dir} is corrupt ({reason}) and no older checkpoint "
                "restores; nothing was changed: start from scratch explicitly (axmini train --from_scratch)"
            )
        checkpointer.set_aside(step, f"corrupt, {reason}", fallback=restored.step)
        return restored.state

    def model(self, state: State) -> nnx.Module:
        """The model with the parameters of `state` (e.g. for sampling)."""
        return nnx.merge(self._graphdef, state["params"], state["rest"])

    # ------------------------------------------------------------------------------------------------
    # The loop.

    def evaluate(self, state: State) -> dict[str, float]:
        eval_input = self.config.evaluator.input
        return self.evaluator.evaluate(
            lambda batch: jax.device_get(self.eval_step(state, self.global_batch(batch, eval_input)))
        )

    def _write_run_files(self) -> None:
        if jax.process_index() == 0:
            path = Path(self.config.dir)
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.txt").write_text(self.config.debug_string() + "\n")

    def run(self, state: State | None = None) -> TrainResult:
        """Trains from `state` (default: `restore_or_init`, before anything is written) to max_step; saves a
        checkpoint on SIGTERM, at the end, and before stopping on a non-finite loss."""
        cfg = self.config
        checkpointer: Checkpointer = cfg.checkpointer.instantiate()
        try:
            state = state if state is not None else self.restore_or_init(checkpointer)
        except BaseException:
            checkpointer.close()
            raise
        self._write_run_files()
        writer: SummaryWriter = cfg.summary_writer.instantiate()
        record = config_record(cfg.debug_string())
        step = int(jax.device_get(state["step"]))
        resumed_at = step or None  # A restored checkpoint is suspect until its first step gives a finite loss.
        if cfg.init_from is not None and not checkpointer.all_steps():  # A warm start's own starting point: a
            # resume never reads the source again.
            checkpointer.save(step, state, {"input_position": step, "init_from": cfg.init_from, **record}, force=True)
        writer.start_at(step)
        losses: dict[int, float] = {}
        eval_metrics: dict[str, float] = {}
        tokens_per_step = cfg.input.global_batch_size * cfg.input.sequence_length
        bar = ProgressBar(step, cfg.max_step, enabled=cfg.progress_bar)
        preempted = False
        non_finite_step = None
        # SIGTERM only sets a flag until the final checkpoint is on storage: a signal that arrives after the last
        # step (during the final evaluation or save) lets the run finish normally.
        with _preemption_notice() as preemption_requested:
            try:
                batches: Iterator[Batch] = self.input.batches(step)
                self.compiled_train_step()  # Compile before timing the first step.
                tick = time.perf_counter()
                while step < cfg.max_step:
                    state, metrics = self.train_step(state, self.global_batch(next(batches)))
                    # What the step's own guard read (the loss and the learner's summaries), as host floats.
                    guarded = ("total_loss", "learning_rate", "grad_norm", "update_norm")
                    numbers = {k: metrics[k] for k in guarded if k in metrics}
                    if not all(math.isfinite(v) for v in numbers.values()):
                        values = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
                        if step == resumed_at:
                            state = self._fall_back(checkpointer, step, f"{values} at the first step after it")
                            step = resumed_at = int(jax.device_get(state["step"]))
                            batches = self.input.batches(step)
                            writer.start_at(step)
                            continue
                        what = f"step {step + 1}: the loss or its update is not finite ({values})"
                        if cfg.non_finite_loss is NonFiniteLoss.STOP:
                            non_finite_step = step + 1
                            self._warn(
                                f"{what}; stopped with a checkpoint of step {step}, the last good state "
                                "(non_finite_loss=STOP); lower the learning rate, or set non_finite_loss=SKIP_UPDATE"
                            )
                            break
                        self._warn(f"{what}; update skipped (non_finite_loss=SKIP_UPDATE)")
                    step += 1
                    now = time.perf_counter()
                    tokens_per_second = tokens_per_step / max(now - tick, 1e-9)
                    tick = now
                    losses[step] = metrics["loss"]
                    bar.update(step, metrics["loss"], tokens_per_second)
                    if step % cfg.log_every_n_steps == 0 or step == cfg.max_step:
                        writer.write(step, {**metrics, **self._speed(tokens_per_second)})
                    if self.evaluator.is_due(step) or (step == cfg.max_step and self.evaluator.enabled):
                        eval_metrics = self.evaluate(state)
                        writer.write(step, eval_metrics, prefix="eval")
                        tick = time.perf_counter()
                    checkpointer.save(step, state, {"input_position": step, **record})
                    if step < cfg.max_step and preemption_requested(step):
                        preempted = True
                        break
                if self.evaluator.enabled and not eval_metrics and not preempted and non_finite_step is None:
                    eval_metrics = self.evaluate(state)  # Resumed at max_step: report the final model anyway.
                checkpointer.save(step, state, {"input_position": step, **record}, force=True)
            finally:
                bar.close()
                checkpointer.close()
                writer.close()
        return TrainResult(step, losses, eval_metrics, preempted, state, non_finite_step)

    @staticmethod
    def _warn(message: str) -> None:
        if jax.process_index() == 0:
            logger.warning(message)

    def _speed(self, tokens_per_second: float) -> dict[str, float]:
        speed = {"tokens_per_second": tokens_per_second}
        utilization = mfu(tokens_per_second, self.flops_per_token, self.mesh.size, self.instance.peak_flops_per_chip)
        if utilization is not None:
            speed["mfu"] = utilization
        return speed


@contextlib.contextmanager
def _preemption_notice() -> Iterator[Callable[[int], bool]]:
    """Yields `requested(step) -> bool`: whether to save and stop now. One process: SIGTERM sets a flag. Several:
    JAX's preemption service (all processes agree on the step)."""
    if jax.process_count() > 1:
        yield multihost_utils.reached_preemption_sync_point
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False
        return
    flag = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield lambda step: flag.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)
