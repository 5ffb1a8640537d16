"""A decoder trained with logit distillation from a frozen teacher (the enlarged model, in enlarge-and-prune).

`DistilledDecoder` is a Decoder (its parameters, forward and decoding are the student's) that also holds a teacher
decoder whose weights are `TeacherWeight` variables instead of `nnx.Param`: the trainer neither differentiates nor
updates them, and saves them with the rest of the train state. `__call__(batch)` returns the student's loss and
metrics and sows the aux loss `distillation` = weight * tau^2 * KL(teacher || student), the KL between the
temperature-softened (tau) next-token distributions averaged over the weighted targets; the trainer adds it to the
loss like every other aux loss. (Anything the teacher sows is collected too: use a dense teacher, whose forward sows
no aux loss.)
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import (
    REQUIRED,
    ConfigBase,
    ConfigValueError,
    Required,
    check_non_negative,
    check_positive,
    config_path,
    replace_config,
)
from axmini.layers.decoder import Decoder

Array = jax.Array


class TeacherWeight(nnx.Variable):
    """A frozen weight of a teacher model: part of the train state, never trained."""


def freeze(module: nnx.Module) -> nnx.Module:
    """`module` with every nnx.Param turned into a TeacherWeight (same value and logical axes), in place."""
    for _, child in nnx.iter_modules(module):
        for name, value in list(vars(child).items()):
            if isinstance(value, nnx.Param):
                setattr(child, name, TeacherWeight(value.get_value(), **value.get_metadata()))
    return module


class Distillation(ConfigBase):
    """How a student learns from its teacher's logits."""

    weight: float = 1.0  # Of the KL term, which the loss adds to the student's own.
    temperature: float = 1.0  # Both distributions are softened by it (and the KL multiplied by its square).


class DistilledDecoder(Decoder):
    """The student decoder (this config's Decoder fields) learning from `teacher`'s logits as well as the targets."""

    class Config(Decoder.Config):
        teacher: Required[Decoder.Config] = REQUIRED  # A decoder over the same vocabulary, e.g. the enlarged model.
        distillation: Distillation = Distillation()

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg.distillation, "temperature")
        check_non_negative(cfg.distillation, "weight")
        if cfg.teacher.vocab_size != cfg.vocab_size:
            raise ConfigValueError(
                f"{config_path(cfg.teacher, 'vocab_size')}={cfg.teacher.vocab_size} differs from the student's "
                f"{config_path(cfg, 'vocab_size')}={cfg.vocab_size}; distillation compares distributions over one "
                "vocabulary"
            )
        self.teacher = freeze(cfg.teacher.instantiate(rngs=rngs))

    def __call__(self, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        cfg = self.config
        inputs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
        logits = self.forward(batch["input_ids"], **inputs).logits
        loss, metrics = self.loss(logits, batch)
        teacher_logits = jax.lax.stop_gradient(self.teacher.forward(batch["input_ids"], **inputs).logits)
        tau = cfg.distillation.temperature
        teacher = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
        student = jax.nn.log_softmax(logits / tau, axis=-1)
        weights = self.loss_weights(batch)
        kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
        kl = jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        self.add_aux_loss("distillation", cfg.distillation.weight * tau**2 * kl)
        return loss, {**metrics, "distillation_kl": kl}


def distilled(student: Decoder.Config, teacher: Decoder.Config, distillation: Distillation) -> Decoder.Config:
    """`student` (a Decoder config) as a DistilledDecoder learning from `teacher`."""
    new = DistilledDecoder.default_config().set(teacher=teacher, distillation=distillation)
    return replace_config(student, target=Decoder, new=new)
