"""The learner: an optax optimizer with a learning-rate schedule, gradient clipping and a weight-decay mask.

Every piece is a config around optax (`config_for_function(optax.adamw)`, `optax.adafactor`, `optax.lion`,
`optax.sgd`, or any optax optimizer taking `learning_rate`). The learner owns what the pieces share:
it builds the schedule (filling `total_steps` from the trainer's `max_step`), hands it to the optimizer as
`learning_rate`, and hands the optimizer a weight-decay mask computed from parameter paths (no decay on
norms, biases and embeddings by default; a list of regexes, searched in paths like
`decoder/stack/layer0/norm/scale`). `trainable_patterns` (regexes over the same paths) freezes every other
parameter through an optax mask: frozen parameters get no update and no optimizer state (LoRA trains its adapters
only).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from axmini.config import (
    REQUIRED,
    Configurable,
    ConfigValueError,
    FunctionConfigBase,
    Required,
    check_non_negative,
    check_positive,
    check_range,
    config_for_function,
    config_path,
    maybe_instantiate,
    optional,
)
from axmini.module import DType


class Decay(enum.Enum):
    """The shape of the learning rate after warmup."""

    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


def warmup_decay_schedule(
    peak_lr: float, warmup_steps: int, total_steps: int, decay: Decay = Decay.COSINE, final_lr_ratio: float = 0.1
) -> optax.Schedule:
    """Linear warmup to `peak_lr` (step s < warmup_steps gets `peak_lr * (s + 1) / warmup_steps`, so the first
    update is not wasted), then `decay` to `final_lr_ratio * peak_lr` at `total_steps` (CONSTANT stays at peak)."""
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = peak_lr * jnp.minimum((step + 1) / max(warmup_steps, 1), 1.0)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        if decay is Decay.COSINE:
            factor = final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        elif decay is Decay.LINEAR:
            factor = 1 - (1 - final_lr_ratio) * progress
        else:
            factor = jnp.ones_like(progress)
        return jnp.where(step < warmup_steps, warmup, peak_lr * factor)

    return schedule


def adamw(**kwargs: Any) -> FunctionConfigBase:
    """optax.adamw with the usual LM settings (b2=0.95, weight decay 0.1)."""
    return config_for_function(optax.adamw).set(**{"b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, **kwargs})


# The ranges of hyperparameters that optax optimizers and schedules name alike, checked in whichever optimizer or
# schedule config has them (the learner owns both, so it knows their vocabulary).
_POSITIVE = ("eps", "clipping_threshold", "peak_lr", "peak_value", "total_steps", "decay_steps", "transition_steps")
_NON_NEGATIVE = ("eps_root", "weight_decay", "weight_decay_rate", "init_value", "end_value", "warmup_steps")
_BELOW_ONE = ("b1", "b2", "momentum")  # [0, 1)
_FRACTIONS = ("decay_rate", "final_lr_ratio", "alpha")  # [0, 1]
# What the learner fills in an optimizer config: a value set there would be silently replaced.
_FILLED_BY_LEARNER = ("learning_rate", "mask", "weight_decay_mask")


def _check_hyperparameters(cfg: FunctionConfigBase) -> None:
    """Refuses an optimizer or schedule hyperparameter out of its range (see _POSITIVE...), or a dtype that is none."""
    names = cfg.field_names()
    check_positive(cfg, *(n for n in names if n in _POSITIVE))
    check_non_negative(cfg, *(n for n in names if n in _NON_NEGATIVE))
    check_range(cfg, *(n for n in names if n in _BELOW_ONE), low=0, high=1)
    check_range(cfg, *(n for n in names if n in _FRACTIONS), low=0, high=1, include_high=True)
    for name in names:
        value = getattr(cfg, name)
        if name.endswith("dtype") and value is not None and DType.type_error(value):
            raise ConfigValueError(f"{config_path(cfg, name)}: {DType.type_error(value)}")


# Regexes over parameter paths that get no weight decay: norm layers, biases, embeddings.
DEFAULT_NO_DECAY = [r"(^|/)[^/]*norm[^/]*/", r"(^|/)bias$", r"(^|/)[^/]*embed[^/]*/"]


def param_path(path: tuple[Any, ...]) -> str:
    """`decoder/stack/norm/scale` from a jax key path (the Variable's `.value` step is dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue
        parts.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
    return "/".join(parts)


class LearnerUpdate(NamedTuple):
    params: Any
    opt_state: Any
    summaries: dict[str, jax.Array]


class Learner(Configurable):
    """Turns gradients into parameter updates: clip by global norm, then the configured optax optimizer."""

    class Config(Configurable.Config):
        # The trainer's max_step, filled by the trainer; a schedule whose `total_steps` is REQUIRED gets it.
        max_step: Required[int] = REQUIRED
        optimizer: FunctionConfigBase = adamw()
        learning_rate: float | FunctionConfigBase = config_for_function(warmup_decay_schedule).set(
            peak_lr=1e-3, warmup_steps=100
        )
        max_grad_norm: float | None = 1.0
        no_decay_patterns: list[str] = list(DEFAULT_NO_DECAY)
        # None: every parameter trains. Else only those whose path one of these regexes matches; the rest is frozen.
        trainable_patterns: list[str] | None = optional(None)
        # Also summarize the norm of each update: one more pass over every parameter's update (+4% step time for a
        # 4-layer, 256-wide, 32k-vocab model on CPU), so off unless asked for.
        update_norm_summary: bool = optional(False)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_non_negative(cfg, "max_step")
        check_positive(cfg, "learning_rate", "max_grad_norm")  # A number learning_rate: a constant one.
        for field in ("no_decay_patterns", "trainable_patterns"):
            for pattern in getattr(cfg, field) or ():
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigValueError(
                        f"{config_path(cfg, field)}: {pattern!r} is not a valid regex ({e}); fix it"
                    ) from None
        optimizer = cfg.optimizer
        for name in _FILLED_BY_LEARNER:
            if name in optimizer.field_names() and getattr(optimizer, name) not in (REQUIRED, None):
                raise ConfigValueError(
                    f"{config_path(optimizer, name)} is filled by the learner (from {config_path(cfg, 'learning_rate')}"
                    f" and {config_path(cfg, 'no_decay_patterns')}); leave it unset"
                )
        _check_hyperparameters(optimizer)
        if isinstance(cfg.learning_rate, FunctionConfigBase):
            _check_hyperparameters(cfg.learning_rate)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        cfg = self.config
        schedule_kwargs = {}
        if isinstance(cfg.learning_rate, FunctionConfigBase) and "total_steps" in cfg.learning_rate.field_names():
            if cfg.learning_rate.total_steps is REQUIRED:
                schedule_kwargs["total_steps"] = cfg.max_step
        self.schedule: Callable[[Any], Any] | float = maybe_instantiate(cfg.learning_rate, **schedule_kwargs)
        names = cfg.optimizer.field_names()
        if "learning_rate" not in names:
            raise ConfigValueError(
                f"{config_path(cfg, 'optimizer')}: {cfg.optimizer.fn} takes no learning_rate; use an optax optimizer"
            )
        kwargs: dict[str, Any] = {"learning_rate": self.schedule}
        mask_field = next((n for n in ("mask", "weight_decay_mask") if n in names), None)
        if mask_field:
            kwargs[mask_field] = self.decay_mask
        optimizer = cfg.optimizer.instantiate(**kwargs)
        clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm else optax.identity()
        self.tx = optax.chain(clip, optimizer)
        if cfg.trainable_patterns is not None:
            transforms = {"trainable": self.tx, "frozen": optax.set_to_zero()}
            self.tx = optax.multi_transform(transforms, self.trainable_labels)

    def decay_mask(self, params: Any) -> Any:
        """True for parameters that get weight decay: those whose path matches no `no_decay_patterns`."""
        return jax.tree.map(lambda match: not match, self._matches(params, self.config.no_decay_patterns))

    def trainable_labels(self, params: Any) -> Any:
        """Per parameter, "trainable" when a `trainable_patterns` regex matches its path, else "frozen"."""
        matches = self._matches(params, self.config.trainable_patterns)
        return jax.tree.map(lambda match: "trainable" if match else "frozen", matches)

    @staticmethod
    def _matches(params: Any, patterns: list[str]) -> Any:
        """Per parameter, whether one of the regexes `patterns` matches (`re.search`) its path."""
        compiled = [re.compile(p) for p in patterns]
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(p.search(param_path(path)) for p in compiled), params
        )

    def learning_rate(self, step: jax.Array) -> jax.Array:
        return jnp.asarray(self.schedule(step) if callable(self.schedule) else self.schedule, jnp.float32)

    def init(self, params: Any) -> Any:
        return self.tx.init(params)

    def update(self, grads: Any, opt_state: Any, params: Any, step: jax.Array) -> LearnerUpdate:
        """One optimizer step; summaries: learning rate, gradient norm (before clipping; the same reduction as the
        clipping's, so free), and the update norm when `update_norm_summary` is on."""
        updates, opt_state = self.tx.update(grads, opt_state, params)
        summaries = {"learning_rate": self.learning_rate(step), "grad_norm": optax.tree.norm(grads)}
        if self.config.update_norm_summary:
            summaries["update_norm"] = optax.tree.norm(updates)
        return LearnerUpdate(optax.apply_updates(params, updates), opt_state, summaries)
