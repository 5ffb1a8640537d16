"""Enlarge-and-prune experiments (`axmini.pruning.enlarge_and_prune`): a model trained enlarged, then pruned to its
target shape inside one cosine schedule, against the target shape trained from scratch on the same tokens.

- `enlarge_and_prune_tiny`: `tiny_decoder`'s shape (width 64, 4 heads over 2 kv heads, SwiGLU 192, 2 layers)
  reached from a model twice as wide (width 128, 8 heads over 4 kv heads, SwiGLU 384): trained enlarged for half
  the run, pruned in three rounds (at 50, 60 and 70% of it) and recovered with logit distillation from the
  enlarged model. A few minutes on 2 CPU cores.
- `enlarge_and_prune_tiny_scratch`: `tiny_decoder` trained from scratch with the same data, batches and schedule:
  the baseline of `benchmarks/enlarge_and_prune_benchmark.py`.
- `tiny_instruction_pruning`: `tiny` with the `instruction_pruning` feature: each layer runs half of its FFN units,
  picked per sequence from its first 16 tokens, the predictor trained with the model.
"""

from __future__ import annotations

from axmini.config import replace_config
from axmini.experiments import register
from axmini.experiments.decoders import DecoderShape, decoder_config, tiny_decoder
from axmini.experiments.lm import Schedule, lm_trainer, tiny
from axmini.features import FEATURES
from axmini.pruning.distillation import Distillation
from axmini.pruning.enlarge_and_prune import EnlargeAndPruneTrainer
from axmini.pruning.structured import TargetShape
from axmini.trainer.trainer import Trainer

TINY_PRUNING_SCHEDULE = Schedule(
    global_batch_size=16, sequence_length=64, max_step=600, peak_lr=3e-3, warmup_steps=30, eval_every_n_steps=50,
    save_every_n_steps=1000,
)  # fmt: skip
TINY_ENLARGED = DecoderShape(2048, 128, 2, 8, 4, 384, tied_embeddings=True)


@register("enlarge_and_prune_tiny")
def enlarge_and_prune_tiny() -> EnlargeAndPruneTrainer.Config:
    """`tiny_decoder`'s shape by enlarge-and-prune: 2x wider for 300 steps, pruned at 300, 360, 420, recovered."""
    cfg = lm_trainer(decoder_config(TINY_ENLARGED), TINY_PRUNING_SCHEDULE)
    cfg = replace_config(cfg, target=Trainer, new=EnlargeAndPruneTrainer.default_config())
    return cfg.set(
        target=TargetShape(dim=64, num_heads=4, num_kv_heads=2, hidden_dim=192),
        prune_steps=[300, 360, 420],
        distillation=Distillation(weight=1.0, temperature=1.0),
    )


@register("enlarge_and_prune_tiny_scratch")
def enlarge_and_prune_tiny_scratch() -> Trainer.Config:
    """`tiny_decoder` trained from scratch on the same tokens and schedule as `enlarge_and_prune_tiny`."""
    return lm_trainer(tiny_decoder(), TINY_PRUNING_SCHEDULE)


@register("tiny_instruction_pruning")
def tiny_instruction_pruning() -> Trainer.Config:
    """`tiny` whose feed-forwards each run the half of their units a predictor picks from a sequence's prompt."""
    cfg = tiny()
    cfg.model = FEATURES["instruction_pruning"].apply(cfg.model)
    return cfg
