"""The named features: each a config modifier that gives a capability to any experiment in one patch.

`user_code` is exactly what a user writes in an experiment file to apply a feature, and `apply(cfg)` runs that
very code, so what the modularity report counts as the cost of integrating a feature is what is tested to work.
`modifier` is the configured modifier the code builds (the report reads its source for the implementation size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from axmini.config import ConfigBase, ConfigModifier
from axmini.layers.attention import SlidingWindowModifier
from axmini.layers.moe import ExpertChoiceGating, MoE, MoEModifier, TopKGating
from axmini.layers.position import RoPEModifier
from axmini.layers.rattention import RAttentionModifier
from axmini.layers.transformer import GlobalLocalModifier, KVSharingModifier
from axmini.pruning.instruction import InstructionPruningModifier


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    description: str
    modifier: Callable[[], ConfigModifier.Config]  # The configured modifier.
    user_code: str  # What a user writes in an experiment file to apply it.

    def apply(self, cfg: ConfigBase) -> ConfigBase:
        """Runs `user_code` on `cfg` and returns the patched config."""
        namespace = {"cfg": cfg}
        exec(self.user_code, namespace)
        return namespace["cfg"]


def _moe(gating: ConfigBase) -> ConfigModifier.Config:
    return MoEModifier.default_config().set(moe=MoE.default_config().set(num_experts=8, gating=gating))


_FEATURES = [
    Feature(
        "rope",
        "rotary position embedding on every attention's QKV projection",
        lambda: RoPEModifier.default_config().set(theta=5e5),
        "from axmini.layers.position import RoPEModifier\n"
        "cfg = RoPEModifier.default_config().set(theta=5e5).instantiate()(cfg)",
    ),
    Feature(
        "sliding_window",
        "local attention with a 512-token window everywhere",
        lambda: SlidingWindowModifier.default_config().set(sliding_window=512),
        "from axmini.layers.attention import SlidingWindowModifier\n"
        "cfg = SlidingWindowModifier.default_config().set(sliding_window=512).instantiate()(cfg)",
    ),
    Feature(
        "global_local",
        "3 local (window 512) : 1 global layers, no RoPE on global layers",
        lambda: GlobalLocalModifier.default_config().set(sliding_window=512),
        "from axmini.layers.transformer import GlobalLocalModifier\n"
        "cfg = GlobalLocalModifier.default_config().set(sliding_window=512).instantiate()(cfg)",
    ),
    Feature(
        "kv_sharing",
        "KV-cache sharing between two blocks of layers (5:3), as in Apple's on-device model",
        lambda: KVSharingModifier.default_config().set(split=(5, 3)),
        "from axmini.layers.transformer import KVSharingModifier\n"
        "cfg = KVSharingModifier.default_config().set(split=(5, 3)).instantiate()(cfg)",
    ),
    Feature(
        "rattention",
        "RAttention (window 512 + residual linear attention) in every attention",
        lambda: RAttentionModifier.default_config().set(sliding_window=512),
        "from axmini.layers.rattention import RAttentionModifier\n"
        "cfg = RAttentionModifier.default_config().set(sliding_window=512).instantiate()(cfg)",
    ),
    Feature(
        "moe_token_choice",
        "every feed-forward becomes a top-2-of-8 token-choice MoE",
        lambda: _moe(TopKGating.default_config().set(top_k=2)),
        "from axmini.layers.moe import MoE, MoEModifier, TopKGating\n"
        "moe = MoE.default_config().set(num_experts=8, gating=TopKGating.default_config().set(top_k=2))\n"
        "cfg = MoEModifier.default_config().set(moe=moe).instantiate()(cfg)",
    ),
    Feature(
        "moe_expert_choice",
        "every feed-forward becomes an 8-expert expert-choice MoE",
        lambda: _moe(ExpertChoiceGating.default_config()),
        "from axmini.layers.moe import MoE, ExpertChoiceGating, MoEModifier\n"
        "moe = MoE.default_config().set(num_experts=8, gating=ExpertChoiceGating.default_config())\n"
        "cfg = MoEModifier.default_config().set(moe=moe).instantiate()(cfg)",
    ),
    Feature(
        "instruction_pruning",
        "every feed-forward runs the half of its hidden units that a mask predictor picks from the prompt",
        lambda: InstructionPruningModifier.default_config().set(active_fraction=0.5),
        "from axmini.pruning.instruction import InstructionPruningModifier\n"
        "cfg = InstructionPruningModifier.default_config().set(active_fraction=0.5).instantiate()(cfg)",
    ),
]

FEATURES: dict[str, Feature] = {feature.name: feature for feature in _FEATURES}
