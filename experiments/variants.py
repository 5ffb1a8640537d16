"""Experiments that differ from those in `lm.py` by one feature patch: RAttention, MoE and Parallel-Track MoE.

Each is the base experiment with one config modifier applied (or, for PT-MoE, another stack in the decoder's
`stack` slot), which is the point: no layer or base experiment is edited to get them.
"""

from __future__ import annotations

from axmini.experiments import register
from axmini.experiments.decoders import afm_on_device, pt_moe_large, pt_moe_tiny, rattention_variant
from axmini.experiments.lm import _SCHEDULES, TINY_SCHEDULE, lm_trainer, tiny
from axmini.features import FEATURES
from axmini.layers.rattention import RAttentionLayout
from axmini.trainer.trainer import Trainer


@register("tiny_rattention")
def tiny_rattention() -> Trainer.Config:
    """`tiny` with RAttention (window 64) in both of its layers (2 layers: no room for a 3:1 pattern)."""
    cfg = tiny()
    cfg.model = rattention_variant(cfg.model, sliding_window=64, layout=RAttentionLayout.ALL)
    return cfg


@register("afm_on_device_rattention")
def afm_on_device_rattention() -> Trainer.Config:
    """The AFM-style 3B with 3 local RAttention (window 512) : 1 global NoPE attention layers, KV sharing off."""
    return lm_trainer(rattention_variant(afm_on_device(), sliding_window=512), _SCHEDULES["afm_on_device"])


@register("tiny_moe")
def tiny_moe() -> Trainer.Config:
    """`tiny` with every feed-forward a top-2-of-8 token-choice MoE."""
    cfg = tiny()
    cfg.model = FEATURES["moe_token_choice"].apply(cfg.model)
    return cfg


@register("pt_moe_tiny")
def pt_moe_tiny_experiment() -> Trainer.Config:
    """Parallel-Track MoE, 2 tracks x 2 blocks of 4 layers, trainable on CPU."""
    return lm_trainer(pt_moe_tiny(), TINY_SCHEDULE)


@register("pt_moe_large")
def pt_moe_large_experiment() -> Trainer.Config:
    """A server-scale PT-MoE (32B parameters, ~6.7B active) to inspect abstractly or launch on a pod."""
    return lm_trainer(pt_moe_large(), _SCHEDULES["afm_on_device"])
