"""Language-model experiments: each a complete `Trainer.Config` (model, input, learner, evaluation, checkpoints).

- `tiny`: what the README's main command trains: a 2-layer, 128-wide decoder on the embedded corpus, sized
  to reach a validation loss well below the unigram baseline in a few minutes on 2 CPU cores.
- `finetune`: the trainer around a model imported from Hugging Face (`axmini convert hf`, `--init_from=hf:DIR`).
- one experiment per model of `experiments.decoders.MODELS` (`tiny_decoder`, `llama_100m`, `llama_7b`,
  `afm_on_device`, ...), with the batch, sequence length and schedule of its scale. They read the embedded
  corpus by default; point them at real data with `--set input.task=NAME --set evaluator.input.task=NAME`.

The dir is left REQUIRED: `axmini train --trainer_dir=DIR` sets it.
"""

from __future__ import annotations

from typing import NamedTuple

from axmini.layers.decoder import Decoder
from axmini.trainer.checkpointer import Checkpointer
from axmini.trainer.evaluator import Evaluator
from axmini.trainer.input import SeqioInput
from axmini.trainer.learner import Decay
from axmini.trainer.trainer import Trainer
from experiments import register
from experiments.decoders import MODELS, DecoderShape, decoder_config


class Schedule(NamedTuple):
    """What changes with scale in an LM experiment, besides the model."""

    global_batch_size: int
    sequence_length: int
    max_step: int
    peak_lr: float
    warmup_steps: int
    eval_every_n_steps: int
    save_every_n_steps: int


def lm_trainer(model: Decoder.Config, schedule: Schedule) -> Trainer.Config:
    """A trainer for `model` on the embedded corpus (train split), evaluated on its validation split."""
    cfg = Trainer.default_config().set(
        model=model,
        input=SeqioInput.default_config().set(
            global_batch_size=schedule.global_batch_size, sequence_length=schedule.sequence_length
        ),
        evaluator=Evaluator.default_config().set(
            input=SeqioInput.default_config().set(
                global_batch_size=schedule.global_batch_size,
                sequence_length=schedule.sequence_length,
                split="validation",
                shuffle=False,
                num_epochs=1,
            ),
            every_n_steps=schedule.eval_every_n_steps,
        ),
        checkpointer=Checkpointer.default_config().set(save_every_n_steps=schedule.save_every_n_steps, keep_last_n=2),
        max_step=schedule.max_step,
    )
    cfg.learner.learning_rate.set(peak_lr=schedule.peak_lr, warmup_steps=schedule.warmup_steps, decay=Decay.COSINE)
    return cfg


TINY_MODEL = DecoderShape(vocab_size=2048, dim=128, num_layers=2, num_heads=4, num_kv_heads=4, hidden_dim=320)
TINY_SCHEDULE = Schedule(16, 128, 1000, 3e-3, 50, 250, 500)


@register("tiny")
def tiny() -> Trainer.Config:
    """The README's main command: trains in a few minutes on 2 CPU cores, then samples."""
    return lm_trainer(decoder_config(TINY_MODEL._replace(tied_embeddings=True)), TINY_SCHEDULE)


FINETUNE_SCHEDULE = Schedule(8, 128, 200, 1e-4, 10, 100, 100)


@register("finetune")
def finetune() -> Trainer.Config:
    """Fine-tuning an imported model: `axmini convert hf DIR --out RUN` or `axmini train --config=finetune
    --init_from=hf:DIR` replace the model (and the corpus's tokenizer) with the imported ones; this experiment gives
    the corpus, a short schedule at a fine-tuning learning rate and the evaluation. Alone, it trains tiny_decoder."""
    return lm_trainer(MODELS["tiny_decoder"](), FINETUNE_SCHEDULE)


# Batch, length and schedule by model scale (the models themselves come from experiments.decoders).
_SCHEDULES = {
    "tiny_decoder": TINY_SCHEDULE,
    "llama_tiny": TINY_SCHEDULE,
    "llama_100m": Schedule(64, 1024, 20_000, 6e-4, 1000, 1000, 1000),
    "llama_1b": Schedule(256, 2048, 100_000, 3e-4, 2000, 5000, 1000),
    "llama_7b": Schedule(1024, 2048, 250_000, 3e-4, 2000, 5000, 1000),
    "llama_70b": Schedule(1024, 4096, 250_000, 1.5e-4, 2000, 5000, 500),
    "afm_on_device": Schedule(1024, 4096, 250_000, 3e-4, 2000, 5000, 1000),
    "afm_on_device_global_local": Schedule(1024, 4096, 250_000, 3e-4, 2000, 5000, 1000),
}


def _model_experiment(name: str) -> None:
    """Registers `experiments.decoders.MODELS[name]` as an experiment at the schedule of its scale."""
    if name not in _SCHEDULES:
        raise LookupError(
            f"experiments.decoders.MODELS[{name!r}] has no schedule in experiments.lm._SCHEDULES; add its batch, "
            "sequence length and schedule there (no default: another scale's schedule would train it silently wrong)"
        )
    schedule = _SCHEDULES[name]

    def experiment() -> Trainer.Config:
        return lm_trainer(MODELS[name](), schedule)

    experiment.__name__ = name
    experiment.__doc__ = f"`experiments.decoders.{name}` on the embedded corpus at its scale's schedule."
    register(name)(experiment)


for _name in MODELS:
    _model_experiment(_name)
