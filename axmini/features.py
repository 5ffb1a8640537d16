"""The named features: each one small patch function that gives a capability to any experiment's config.

A feature is the function a user would write in an experiment file to apply it. `Feature.apply` runs that very
function, and `Feature.user_code` is its body (read with `inspect`) after the imports it uses, which is what the
modularity report counts and shows: the lines counted are the lines that run. `Feature.modifiers` are the config
modifier classes the body names, whose source is the feature's implementation.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from collections.abc import Callable

from axmini.config import ConfigBase, ConfigModifier
from axmini.layers.attention import SlidingWindowModifier, map_attention_configs
from axmini.layers.moe import ExpertChoiceGating, MoE, MoEModifier, TopKGating
from axmini.layers.norm import RMSNorm
from axmini.layers.position import RoPEModifier
from axmini.layers.rattention import RAttentionModifier
from axmini.layers.transformer import GlobalLocalModifier, KVSharingModifier
from axmini.lora import LoRAModifier
from axmini.qat import QATModifier

Patch = Callable[[ConfigBase], ConfigBase]


@dataclasses.dataclass(frozen=True)
class Feature:
    """A named patch `cfg -> cfg`; its docstring's first line is the description."""

    name: str
    patch: Patch

    @property
    def description(self) -> str:
        return (inspect.getdoc(self.patch) or "").split("\n", 1)[0]

    def apply(self, cfg: ConfigBase) -> ConfigBase:
        """The patched config; `cfg` itself is left as it was."""
        return self.patch(cfg)

    @property
    def user_code(self) -> str:
        """What a user writes to apply the feature: the imports the patch's body uses, then that body."""
        body = _body(self.patch)
        names = {node.id for stmt in body for node in ast.walk(stmt) if isinstance(node, ast.Name)}
        imports = []
        for node in ast.parse(inspect.getsource(sys.modules[self.patch.__module__])).body:
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                used = [alias.name for alias in node.names if (alias.asname or alias.name) in names]
                if used:
                    imports.append(f"from {node.module} import {', '.join(used)}")
        source = textwrap.dedent(inspect.getsource(self.patch)).splitlines()
        code = textwrap.dedent("\n".join(source[body[0].lineno - 1 : body[-1].end_lineno]))
        return "\n".join([*imports, code])

    @property
    def modifiers(self) -> list[type[ConfigModifier]]:
        """The ConfigModifier classes the patch's body names, in order of first use."""
        names = [node.id for stmt in _body(self.patch) for node in ast.walk(stmt) if isinstance(node, ast.Name)]
        found = [self.patch.__globals__.get(name) for name in dict.fromkeys(names)]
        return [v for v in found if isinstance(v, type) and issubclass(v, ConfigModifier)]


def _body(fn: Patch) -> list[ast.stmt]:
    """The statements of a function's body, its docstring left out."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(fn))).body
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    return body


FEATURES: dict[str, Feature] = {}


def feature(patch: Patch) -> Patch:
    """Registers `patch` as the feature named after it."""
    FEATURES[patch.__name__] = Feature(patch.__name__, patch)
    return patch


@feature
def rope(cfg: ConfigBase) -> ConfigBase:
    """Rotary position embedding on every attention's QKV projection."""
    return RoPEModifier.default_config().set(theta=5e5).instantiate()(cfg)


@feature
def sliding_window(cfg: ConfigBase) -> ConfigBase:
    """Local attention with a 512-token window everywhere."""
    return SlidingWindowModifier.default_config().set(sliding_window=512).instantiate()(cfg)


@feature
def qk_norm(cfg: ConfigBase) -> ConfigBase:
    """RMSNorm on the queries and keys of every attention (an existing knob of the attention slot)."""
    return map_attention_configs(cfg, lambda attention: attention.set(qk_norm=RMSNorm.default_config()))


@feature
def global_local(cfg: ConfigBase) -> ConfigBase:
    """Three local (window 512) : one global layers, no RoPE on global layers."""
    return GlobalLocalModifier.default_config().set(sliding_window=512).instantiate()(cfg)


@feature
def kv_sharing(cfg: ConfigBase) -> ConfigBase:
    """KV-cache sharing between two blocks of layers (5:3), as in Apple's on-device model."""
    return KVSharingModifier.default_config().set(split=(5, 3)).instantiate()(cfg)


@feature
def rattention(cfg: ConfigBase) -> ConfigBase:
    """RAttention (window 512 + residual linear attention) in every attention."""
    return RAttentionModifier.default_config().set(sliding_window=512).instantiate()(cfg)


@feature
def moe_token_choice(cfg: ConfigBase) -> ConfigBase:
    """Every feed-forward becomes a top-2-of-8 token-choice MoE."""
    moe = MoE.default_config().set(num_experts=8, gating=TopKGating.default_config().set(top_k=2))
    return MoEModifier.default_config().set(moe=moe).instantiate()(cfg)


@feature
def moe_expert_choice(cfg: ConfigBase) -> ConfigBase:
    """Every feed-forward becomes an 8-expert expert-choice MoE."""
    moe = MoE.default_config().set(num_experts=8, gating=ExpertChoiceGating.default_config())
    return MoEModifier.default_config().set(moe=moe).instantiate()(cfg)


@feature
def qat(cfg: ConfigBase) -> ConfigBase:
    """Quantization-aware training at 2 bits of every linear weight but the embedding and the head."""
    return QATModifier.default_config().set(bits=2).instantiate()(cfg)


@feature
def lora(cfg: ConfigBase) -> ConfigBase:
    """Rank-8 LoRA adapters on every linear weight but the embedding and the head; only the adapters train."""
    return LoRAModifier.default_config().set(rank=8, alpha=16.0).instantiate()(cfg)
