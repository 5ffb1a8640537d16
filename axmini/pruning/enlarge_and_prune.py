"""Enlarge-and-prune (arXiv 2503.05920): train an enlarged model, prune it gradually to a target shape at scheduled
steps, and let it recover, all under the one learning-rate schedule of the run.

`EnlargeAndPruneTrainer.Config` is a Trainer's config whose `model` is the enlarged model, plus the `target` shape,
the `prune_steps` (round i, at `prune_steps[i]`, reaches the i-th of the shapes evenly interpolated from the
model's to the target's: `structured.schedule`), the importance `criterion` and how many `calibration_batches` it
reads, and optional `distillation`: after the first round the model learns from the enlarged model's logits as well
(a `DistilledDecoder`, through the aux-loss path).

The run is a sequence of stages, one per model shape, each an ordinary Trainer built from this config with the stage's
model and running from its first to its last step. Its schedule's `total_steps` is this run's `max_step`, so the
learning rate follows one cosine over the whole run; batches are indexed by step, so the data go on where the previous
stage stopped. The enlarged model starts fresh, or from a trained model by the Trainer's `init_from` (a trainer dir or
`hf:DIR`: the first stage warm-starts as any run does). At a pruning step the previous stage's final state is pruned by
`structured.prune` (scores from the next `calibration_batches` training batches): parameters, and the optimizer
statistics shaped like them, are sliced alike, so the optimizer carries on; the result is saved as the next stage's
first checkpoint, and the pruned model's evaluation loss is logged as `pruned/loss`. Every stage writes this run's
metrics (one curve); stage i checkpoints under `<dir>/stages/<i>`, the last stage (the target model) under this run's
checkpoint dir, so `axmini sample` and `restore_or_init` read the pruned model. A run resumes in the stage it stopped
in.

Single-process: pruning reads the parameters on the host.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from axmini.config import (
    REQUIRED,
    ConfigValueError,
    FunctionConfigBase,
    Required,
    check_non_negative,
    check_positive,
    config_path,
    replace_config,
)
from axmini.layers.decoder import Decoder
from axmini.module import build_abstract
from axmini.pruning.distillation import Distillation, distilled
from axmini.pruning.slicing import shapes, slice_tree
from axmini.pruning.structured import (
    Criterion,
    ModelShape,
    TargetShape,
    check_target,
    model_shape,
    prune,
    reshape,
    schedule,
)
from axmini.trainer.trainer import State, Trainer, TrainResult


class Stage(NamedTuple):
    start: int  # The first step it trains (its checkpoint at `start` is where it begins).
    end: int  # The step it trains to.
    shape: ModelShape
    student: Decoder.Config  # The model of this shape (without the teacher, when distilling).
    trainer: Trainer  # Built from this run's config with the stage's model, steps and directories.


class EnlargeAndPruneTrainer(Trainer):
    """Trains `model` (the enlarged model) and prunes it to `target` at `prune_steps`; see the module docstring."""

    class Config(Trainer.Config):
        target: Required[TargetShape] = REQUIRED
        prune_steps: Required[list[int]] = REQUIRED  # Increasing steps in (0, max_step); the last reaches target.
        criterion: Criterion = Criterion.TAYLOR
        calibration_batches: int = 4
        # After the first round, the model learns from the enlarged model's logits as well. None: off.
        distillation: Distillation | None = None

    def __init__(self, cfg: Config, *, devices: list[jax.Device] | None = None):
        super().__init__(cfg, devices=devices)  # The enlarged model's trainer: every check of a plain run.
        final = self._check_pruning(self.config)
        self.stages = self._stages(cfg, final, devices)

    def _check_pruning(self, cfg: Config) -> ModelShape:
        check_positive(cfg, "calibration_batches")
        if cfg.distillation is not None:
            check_positive(cfg.distillation, "temperature")
            check_non_negative(cfg.distillation, "weight")
        steps = list(cfg.prune_steps)
        if not steps or steps != sorted(set(steps)) or steps[0] <= 0 or steps[-1] >= cfg.max_step:
            raise ConfigValueError(
                f"{config_path(cfg, 'prune_steps')}={steps} must be increasing steps in (0, "
                f"{config_path(cfg, 'max_step')}={cfg.max_step}), at least one"
            )
        return check_target(build_abstract(cfg.model), cfg.target)

    def _stages(self, cfg: Config, final: ModelShape, devices: list[jax.Device] | None) -> list[Stage]:
        """Every stage, its trainer built now: a stage that cannot be built is refused before anything is written."""
        enlarged = model_shape(build_abstract(cfg.model))
        shapes_ = [enlarged, *schedule(enlarged, final, len(cfg.prune_steps))]
        students = [cfg.model]
        for before, after in itertools.pairwise(shapes_):
            students.append(reshape(students[-1], before, after))
        bounds = [0, *cfg.prune_steps, cfg.max_step]
        stages = []
        for i, (shape, student) in enumerate(zip(shapes_, students)):
            model = student
            if i and cfg.distillation is not None:
                model = distilled(student, cfg.model, cfg.distillation)
            last = i == len(shapes_) - 1
            stage_cfg = self._stage_config(cfg, i, model, bounds[i + 1], last)
            stages.append(Stage(bounds[i], bounds[i + 1], shape, student, stage_cfg.instantiate(devices=devices)))
        return stages

    def _stage_config(self, cfg: Config, index: int, model: Decoder.Config, end: int, last: bool) -> Trainer.Config:
        """A plain trainer config: this run's fields, the stage's model, its steps and directories."""
        stage = replace_config(cfg, target=type(self), new=Trainer.default_config())
        stage_dir = Path(cfg.dir) / "stages" / str(index)
        stage.set(model=model, max_step=end, dir=str(stage_dir))
        if index:  # Only the enlarged model starts from `init_from`; a pruned stage starts from the pruned state.
            stage.init_from = None
        stage.summary_writer.dir = self.config.summary_writer.dir  # One metrics file for the whole run.
        stage.checkpointer.dir = self.config.checkpointer.dir if last else str(stage_dir / "checkpoints")
        schedule_cfg = stage.learner.learning_rate
        if isinstance(schedule_cfg, FunctionConfigBase) and getattr(schedule_cfg, "total_steps", None) is REQUIRED:
            schedule_cfg.total_steps = cfg.max_step  # One schedule over the whole run, not one per stage.
        return stage

    # ------------------------------------------------------------------------------------------------
    # Running.

    def run(self) -> TrainResult:
        """Runs every stage from the last one started, pruning between stages; the result is the last stage's,
        with the losses of every step this call ran."""
        self._write_run_files()
        started = [i for i, stage in enumerate(self.stages) if self._started(stage)]
        first = started[-1] if started else 0
        losses: dict[int, float] = {}
        state = None
        for i in range(first, len(self.stages)):
            stage = self.stages[i]
            if i > first:
                self._begin(stage, self.stages[i - 1], state)
            result = stage.trainer.run()
            losses.update(result.losses)
            state = result.state
            if result.preempted:
                break
        return result._replace(losses=losses)

    @staticmethod
    def _started(stage: Stage) -> bool:
        directory = Path(stage.trainer.config.checkpointer.dir)
        if not directory.is_dir():
            return False
        checkpointer = stage.trainer.config.checkpointer.instantiate(read_only=True)
        try:
            return bool(checkpointer.all_steps())
        finally:
            checkpointer.close()

    def _begin(self, stage: Stage, previous: Stage, state: State) -> None:
        """Prunes the previous stage's final `state` to `stage`'s shape and saves it as `stage`'s first checkpoint.
        Pruning runs on one device, on a host copy of the state."""
        trainer, cfg = stage.trainer, self.config
        state = jax.tree.map(jnp.asarray, jax.device_get(state))
        calibration = itertools.islice(trainer.input.batches(stage.start), cfg.calibration_batches)
        target = TargetShape(**{f: getattr(stage.shape, f) for f in TargetShape().field_names()})
        student = _student(previous.student, state)
        pruned = prune(
            previous.student,
            student,
            [jax.tree.map(jnp.asarray, b) for b in calibration],
            target,
            criterion=cfg.criterion,
        )
        param_shapes = shapes(state["params"])
        params = slice_tree(state["params"], pruned.removals, param_shapes, scale=True)
        opt_state = slice_tree(state["opt_state"], pruned.removals, param_shapes, scale=False)
        teacher = state["rest"]["teacher"] if "teacher" in state["rest"] else state["params"]
        new_state = {
            "step": jnp.asarray(stage.start, jnp.int32),
            "params": params,
            "rest": _fill(trainer.abstract_state["rest"], state["rest"], teacher),
            "opt_state": _restart_misfits(opt_state, params, trainer),
        }
        if jax.tree.structure(new_state) != jax.tree.structure(trainer.abstract_state):
            raise ValueError(f"pruning at step {stage.start} gave a state that does not fit the stage's model")
        new_state = jax.device_put(new_state, trainer.state_shardings)
        if trainer.evaluator.enabled:
            writer = self.config.summary_writer.instantiate()
            writer.start_at(stage.start)
            writer.write(stage.start, trainer.evaluate(new_state), prefix="pruned")
            writer.close()
        checkpointer = trainer.config.checkpointer.instantiate()
        checkpointer.save(stage.start, new_state, {"input_position": stage.start}, force=True)
        checkpointer.close()

    # ------------------------------------------------------------------------------------------------
    # The pruned model (what sampling reads).

    def restore_or_init(self, checkpointer: Any = None) -> State:
        """The last stage's latest state (the target model)."""
        return self.stages[-1].trainer.restore_or_init(checkpointer)

    def model(self, state: State) -> nnx.Module:
        """The target model with the parameters of a last-stage `state`."""
        return self.stages[-1].trainer.model(state)


def _student(cfg: Decoder.Config, state: State) -> Decoder:
    """The plain decoder of `cfg` with the train state's parameters (a distilled stage's teacher left out)."""
    graphdef, _, rest = nnx.split(build_abstract(cfg), nnx.Param, ...)
    flat_rest = dict(nnx.to_flat_state(state["rest"]))
    rest = nnx.from_flat_state([(path, flat_rest[path]) for path, _ in nnx.to_flat_state(rest)])
    return nnx.merge(graphdef, state["params"], rest)


def _restart_misfits(opt_state: Any, params: nnx.State, trainer: Trainer) -> Any:
    """`opt_state` with the statistics that slicing could not shape like their parameter (Adafactor's factored
    moments) restarted from the optimizer's initial value for `params`."""
    fits = lambda a, b: np.shape(a) == tuple(b.shape)
    if all(jax.tree.leaves(jax.tree.map(fits, opt_state, trainer.abstract_state["opt_state"]))):
        return opt_state
    fresh = jax.jit(trainer.learner.init)(params)
    return jax.tree.map(lambda a, b: a if np.shape(a) == np.shape(b) else b, opt_state, fresh)


def _fill(abstract_rest: nnx.State, rest: nnx.State, teacher: nnx.State) -> nnx.State:
    """The new stage's non-trainable variables: the teacher's from `teacher` (the enlarged model's weights), any
    other from the previous stage's `rest`."""
    old, weights = dict(nnx.to_flat_state(rest)), dict(nnx.to_flat_state(teacher))
    filled = []
    for path, variable in nnx.to_flat_state(abstract_rest):
        source = weights[path[1:]] if path[0] == "teacher" else old[path]
        filled.append((path, variable.replace(source.get_value())))
    return nnx.from_flat_state(filled)
