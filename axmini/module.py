"""The layer base on Flax NNX: parameters with logical axes, abstract and sharded building, aux outputs.

A layer is an `nnx.Module` built from its config: `Layer.__init__(cfg, *, rngs)`. It declares every
parameter through `self.param(...)`, which records the parameter's logical axis names (`embed`,
`heads`, `mlp`, ...). Only mesh rules map logical names to mesh axes (`logical_to_spec`), so the same
model builds on one CPU, on 8 simulated devices or on a pod.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from axmini.config import (
    Configurable,
    ConfigValueError,
    FunctionConfigBase,
    ValueType,
    check_non_negative,
    config_for_function,
    config_path,
    optional,
)

# A logical-axis rule maps one logical name to a mesh axis, a tuple of mesh axes, or None (replicated).
LogicalAxisRules = Sequence[tuple[str, str | tuple[str, ...] | None]]
Initializer = Callable[[jax.Array, tuple[int, ...], Any, int], jax.Array]


# ----------------------------------------------------------------------------------------------------
# Initializers: each is a function of hyperparameters returning `init(key, shape, dtype, fan_in)`,
# so `config_for_function(fan_in_normal).set(scale=0.5)` configures one.


def fan_in_normal(scale: float = 1.0) -> Initializer:
    """Normal with std `scale / sqrt(fan_in)`: keeps activations at unit scale through a projection."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any, fan_in: int) -> jax.Array:
        return (scale / math.sqrt(max(fan_in, 1))) * jax.random.normal(key, shape, dtype)

    return init


def normal(stddev: float = 1.0) -> Initializer:
    """Normal with a fixed std, whatever the fan-in (embeddings)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any, fan_in: int) -> jax.Array:
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def constant(value: float = 0.0) -> Initializer:
    """Every entry equal to `value` (biases, norm scales)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any, fan_in: int) -> jax.Array:
        return jnp.full(shape, value, dtype)

    return init


# ----------------------------------------------------------------------------------------------------
# Auxiliary outputs: sown into named collections and read back by exact module path.


class AuxLoss(nnx.Intermediate):
    """A scalar that the trainer adds to the loss (e.g. MoE load balance), found by its path."""


class Summary(nnx.Intermediate):
    """A value to log (e.g. expert load), found by its path."""


class DType(ValueType):
    """A floating-point dtype (jnp.float32, jnp.bfloat16...); from the command line by name: `model.dtype=bfloat16`."""

    @classmethod
    def type_error(cls, value: Any) -> str | None:
        try:
            floating = value is not None and jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            floating = False
        return None if floating else f"expected a floating-point dtype (float32, bfloat16...), got {value!r}"

    @classmethod
    def parse(cls, text: str) -> Any:
        value = getattr(jnp, text.split(".")[-1], None)  # bfloat16, jnp.bfloat16, jax.numpy.bfloat16
        if value is None or cls.type_error(value):
            raise ValueError(text)
        return value


class Layer(Configurable, nnx.Module):
    """Base of every layer: built from its config, with one way to declare a parameter and one to read a weight.

    `weight_names` lists the parameters that are weights of linear maps (not biases, norm scales or routers). The
    layer reads them with `read_weight`, so a `weight_transform` in its config (QAT's fake quantization, a LoRA
    adapter: see axmini/layers/weight_transform.py) rewrites them there, in every layer that has weights, without a
    line of the layer knowing which transform it is. Building such a layer gives each weight `name` its own
    transform module, `<name>_<suffix>` (e.g. `wi_0_lora`), built from the weight after the layer's own constructor.
    """

    class Config(Configurable.Config):
        param_dtype: DType = jnp.float32
        # How `param` draws this layer's parameters (unless it passes its own init): a layer that draws none refuses
        # a param_init set on it (see `check_param_inits_used`).
        param_init: FunctionConfigBase = config_for_function(fan_in_normal)
        # A WeightTransform config applied to each of the layer's `weight_names` where it reads them. None: off.
        weight_transform: Layer.Config | None = optional(None)

        def instantiate(self, **kwargs: Any) -> Any:
            layer = super().instantiate(**kwargs)
            if layer.config.weight_transform is not None:
                layer._attach_weight_transforms(kwargs["rngs"])
            return layer

    weight_names: tuple[str, ...] = ()

    def __init__(self, cfg: Layer.Config, *, rngs: nnx.Rngs):
        del rngs  # Subclasses draw from it in `param`.
        super().__init__(cfg)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        init = cfg.param_init
        check_non_negative(init, *(name for name in ("scale", "stddev") if name in init.field_names()))

    def param(
        self,
        shape: Sequence[int],
        *,
        axes: Sequence[str | None],
        rngs: nnx.Rngs,
        fan_in_axes: Sequence[int] = (0,),
        init: FunctionConfigBase | None = None,
    ) -> nnx.Param:
        """A parameter of `shape` whose dims carry logical `axes`, drawn by `init` (default: the config's).

        The fan-in passed to the initializer is the product of the dims in `fan_in_axes`.
        """
        shape = tuple(int(d) for d in shape)
        if len(axes) != len(shape):
            raise ValueError(f"{type(self).__name__}: shape {shape} and axes {tuple(axes)} differ in rank")
        if init is None:
            self._draws_param_init = True
        init_fn = (init or self.config.param_init).instantiate()
        fan_in = int(np.prod([shape[i] for i in fan_in_axes])) if fan_in_axes else 1
        value = init_fn(rngs.params(), shape, self.config.param_dtype, fan_in)
        # The fan-in axes are the weight's input dims, which a weight transform keeps apart from its output dims.
        return nnx.Param(value, axes=tuple(axes), fan_in_axes=tuple(fan_in_axes))

    def read_weight(self, weight: nnx.Param) -> jax.Array:
        """The value of one of `weight_names` as the layer computes with it: through its weight transform, if any."""
        if self.config.weight_transform is None:
            return weight[...]
        name = next((n for n in self.weight_names if getattr(self, n, None) is weight), None)
        if name is None:
            raise ValueError(f"{type(self).__name__}.read_weight: the parameter is not one of {self.weight_names}")
        return getattr(self, f"{name}_{self.config.weight_transform.klass.suffix}")(weight[...])

    def _attach_weight_transforms(self, rngs: nnx.Rngs) -> None:
        transform = self.config.weight_transform
        for name in self.weight_names:
            weight = getattr(self, name, None)
            if isinstance(weight, nnx.Param):
                setattr(self, f"{name}_{transform.klass.suffix}", transform.instantiate(weight=weight, rngs=rngs))

    def add_aux_loss(self, name: str, value: jax.Array) -> None:
        """Sows a scalar loss term for the enclosing `capture_aux`; repeated calls in one step add up."""
        self._sow(AuxLoss, name, value, init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)

    def add_summary(self, name: str, value: jax.Array) -> None:
        """Sows a value to log for the enclosing `capture_aux`; repeated calls in one step keep the last."""
        self._sow(Summary, name, value, init_fn=lambda: None, reduce_fn=lambda a, b: b)

    def _sow(self, kind: type[nnx.Variable], name: str, value: jax.Array, **reduce: Callable) -> None:
        # Sown values are collected by nnx.capture, which marks every module it runs with `__captures__`. Outside
        # one nobody reads them, and flax 0.12 deprecates keeping them on the module: they are dropped.
        if hasattr(self, "__captures__"):
            self.sow(kind, name, value, **reduce)


def _path_string(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def _flat_values(state: nnx.State) -> dict[str, jax.Array]:
    return {_path_string(path): v.get_value() for path, v in nnx.to_flat_state(state)}


class AuxCapture(NamedTuple):
    output: Any
    losses: dict[str, jax.Array]  # {module path/name: scalar}
    summaries: dict[str, jax.Array]


def capture_aux(fn: Callable[..., Any], model: nnx.Module, *args: Any, **kwargs: Any) -> AuxCapture:
    """Runs `fn(model, *args, **kwargs)` and returns its output with every AuxLoss and Summary sown meanwhile."""
    output, losses, summaries = nnx.capture(fn, AuxLoss, Summary)(model, *args, **kwargs)
    return AuxCapture(output, _flat_values(losses), _flat_values(summaries))


def stack_modules(cfg: Layer.Config, num: int, *, axis: str, rngs: nnx.Rngs) -> nnx.Module:
    """`num` independent modules built from `cfg`, as one module whose parameters have a leading dim of size `num`
    with logical axis `axis` (`layers` for a scanned stack, `track` for parallel tracks): run them with
    jax.lax.scan or jax.vmap over that dim."""
    module = _create_stacked(cfg.freeze(), num, rngs)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            axes = node.get_metadata().get("axes") or (None,) * (node.get_value().ndim - 1)
            node.set_metadata(axes=(axis, *axes))
    return module


@functools.partial(nnx.jit, static_argnums=(0, 1))
def _create_stacked(cfg: Layer.Config, num: int, rngs: nnx.Rngs) -> nnx.Module:
    """Initializes the copies in one compiled call (eagerly, vmapped initializers compile op by op)."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return cfg.instantiate(rngs=rngs)

    return create(rngs)


def resow(module: nnx.Module, losses: nnx.State, summaries: nnx.State) -> None:
    """Sows on a stacked `module` what its copies sowed inside a scan or vmap (captured per copy there, so each
    value leads with the stacked dim): aux losses summed over the copies (a scalar, as from one module), summaries
    kept stacked."""
    modules = dict(nnx.iter_modules(module))
    for path, variable in nnx.to_flat_state(losses):
        modules[path[:-1]].add_aux_loss(path[-1], jnp.sum(variable.get_value(), axis=0))
    for path, variable in nnx.to_flat_state(summaries):
        modules[path[:-1]].add_summary(path[-1], variable.get_value())


# ----------------------------------------------------------------------------------------------------
# From logical axes to shardings.


def logical_to_spec(
    axes: Sequence[str | None], rules: LogicalAxisRules, shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """The PartitionSpec of a value whose dims carry logical `axes`, under `rules`.

    A mesh axis is used at most once per value (the first dim that asks for it gets it); given `shape`
    and `mesh`, a dim that the mesh axes do not divide stays replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None and shape is not None and mesh_axes:
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[i] % size:
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _variable_axes(v: nnx.Variable) -> tuple[str | None, ...]:
    axes = v.get_metadata().get("axes")
    return tuple(axes) if axes is not None else (None,) * np.ndim(v.get_value())


def state_shardings(state: nnx.State, mesh: Mesh, rules: LogicalAxisRules) -> Any:
    """A NamedSharding per variable of `state` (abstract or concrete), from its logical axes."""

    def sharding(v: nnx.Variable) -> NamedSharding:
        value = v.get_value()
        return NamedSharding(mesh, logical_to_spec(_variable_axes(v), rules, np.shape(value), mesh))

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


_SHARDING_CONTEXT: contextvars.ContextVar[tuple[Mesh, LogicalAxisRules] | None] = contextvars.ContextVar(
    "axmini_sharding_context", default=None
)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: LogicalAxisRules) -> Iterator[None]:
    """Within this context (while tracing), `shard_activation` constrains activations on `mesh`."""
    token = _SHARDING_CONTEXT.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _SHARDING_CONTEXT.reset(token)


def current_sharding_context() -> tuple[Mesh, LogicalAxisRules] | None:
    """The (mesh, rules) of the enclosing `sharding_context`, or None outside one."""
    return _SHARDING_CONTEXT.get()


def shard_activation(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """A sharding hint for an activation with logical `axes` (e.g. batch, length, embed); no-op outside
    a `sharding_context`."""
    context = _SHARDING_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    spec = logical_to_spec(axes, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------------------------------
# Building: abstractly (no memory) or directly sharded on a mesh.


def build_abstract(cfg: Layer.Config, seed: int = 0) -> nnx.Module:
    """The model with ShapeDtypeStructs instead of arrays: inspect a 70B config on a laptop. Every layer's config
    is checked on the way (a config a layer refuses raises ConfigValueError, nothing is allocated)."""
    model = nnx.eval_shape(lambda: cfg.instantiate(rngs=nnx.Rngs(seed)))
    check_param_inits_used(model)
    return model


def check_param_inits_used(model: nnx.Module) -> None:
    """Refuses a param_init changed on a layer that draws no parameter from it (a decoder, a stack, a norm whose
    scale starts at 1): it would be recorded in config.txt and silently ignored."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Layer) and not getattr(module, "_draws_param_init", False):
            cfg = module.config
            if cfg.param_init != type(module).default_config().param_init:
                raise ConfigValueError(
                    f"{config_path(cfg, 'param_init')} is set, but {type(module).__name__} draws no parameter from "
                    "it; set the param_init of the layers below it that own parameters"
                )


def build_sharded(cfg: Layer.Config, mesh: Mesh, rules: LogicalAxisRules, seed: int = 0) -> nnx.Module:
    """Initializes the model directly sharded on `mesh`: no parameter is ever whole on one device."""
    graphdef, abstract_state = nnx.split(build_abstract(cfg, seed))
    shardings = state_shardings(abstract_state, mesh, rules)

    def init() -> nnx.State:
        return nnx.split(cfg.instantiate(rngs=nnx.Rngs(seed)))[1]

    with sharding_context(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


class ParamInfo(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...]
    spec: PartitionSpec | None

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.count * np.dtype(self.dtype).itemsize


def param_infos(model: nnx.Module, mesh: Mesh | None = None, rules: LogicalAxisRules = ()) -> list[ParamInfo]:
    """Every parameter of `model` (concrete or abstract): path, shape, dtype, logical axes, spec."""
    infos = []
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = v.get_value()
        axes = _variable_axes(v)
        spec = logical_to_spec(axes, rules, np.shape(value), mesh) if mesh is not None else None
        infos.append(ParamInfo(_path_string(path), tuple(np.shape(value)), str(np.dtype(value.dtype)), axes, spec))
    return infos


def per_device_bytes(info: ParamInfo, mesh: Mesh) -> int:
    """Bytes of one device's shard of the parameter."""
    shards = 1
    for entry in info.spec or ():
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            shards *= mesh.shape[axis]
    return info.bytes // shards


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.4g}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return str(n)


def param_table(model: nnx.Module, mesh: Mesh | None = None, rules: LogicalAxisRules = ()) -> str:
    """A printable table of parameters with totals (count, bytes and, given a mesh, bytes per device)."""
    infos = param_infos(model, mesh, rules)
    rows = [("path", "shape", "dtype", "axes", "spec" if mesh else "")]
    for info in infos:
        rows.append((info.path, str(info.shape), info.dtype, str(info.axes), str(info.spec) if mesh else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    total = sum(i.count for i in infos)
    total_bytes = sum(i.bytes for i in infos)
    summary = f"total: {total:,} parameters ({_human(total)}), {_human(total_bytes, 'B')}"
    if mesh is not None:
        device_bytes = sum(per_device_bytes(i, mesh) for i in infos)
        summary += f", {_human(device_bytes, 'B')} per device on mesh {dict(mesh.shape)}"
    return "\n".join(lines + [summary])


def count_params(model: nnx.Module) -> int:
    return sum(i.count for i in param_infos(model))


def constant_init(value: float) -> FunctionConfigBase:
    """The config of a constant initializer, for `Layer.param(init=...)`."""
    return config_for_function(constant, value=value)
