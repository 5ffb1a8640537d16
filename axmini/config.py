"""Typed, strictly encapsulated configs: every object in axmini is built from its own config.

A config is a dataclass nested in the class it builds::

    class Linear(Layer):
        class Config(Layer.Config):
            input_dim: Required[int] = REQUIRED
            bias: bool = False

    cfg = Linear.default_config().set(input_dim=8)
    layer = cfg.instantiate(rngs=rngs)

Subclasses of `ConfigBase` become keyword-only dataclasses automatically. Assignment is checked
(unknown fields and wrong types are refused), configs are values (assigning one copies it, and the copy
an object is built from is frozen), and `debug_string()` prints one `path: value` line per leaf, which
is what golden files and the modularity report compare.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from ml_collections.config_flags import config_path as dotted_path_parser

T = TypeVar("T")
C = TypeVar("C", bound="ConfigBase")


class _RequiredType:
    """The type of `REQUIRED`: a field that has no sensible default and must be set before building."""

    _instance: _RequiredType | None = None

    def __new__(cls) -> _RequiredType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"

    def __copy__(self) -> _RequiredType:
        return self

    def __deepcopy__(self, memo: dict) -> _RequiredType:
        return self


REQUIRED = _RequiredType()


def optional(default: Any = None) -> Any:
    """The default of an optional feature's field (`post_norm: RMSNorm.Config | None = optional(None)`).

    Such a field is left out of `debug_string` (the golden text of a config) while it holds its default, so a
    feature that is off by default changes no existing golden text; once set, it appears like any other field.
    """
    if _is_config_container(default):
        raise TypeError("optional(): the default of an optional field must be a plain value (None, a number...)")
    return dataclasses.field(default=default, metadata={"optional": True})


class _RequiredAlias:
    """`Required[int]` is `int | REQUIRED`: the field holds an int once set, REQUIRED until then."""

    def __getitem__(self, item: Any) -> Any:
        return Union[item, _RequiredType]


Required = _RequiredAlias()


class ConfigError(Exception):
    """Base of every config error."""


class UnknownFieldError(ConfigError, AttributeError):
    """A field name that the config class does not have."""


class RequiredFieldMissingError(ConfigError, ValueError):
    """An object was built while a REQUIRED field of its config was still unset."""


class ConfigTypeError(ConfigError, TypeError):
    """A value whose type does not match the field's declared type."""


class FrozenConfigError(ConfigError, AttributeError):
    """An attempt to change the config an object was built from."""


class ConfigValueError(ConfigError, ValueError):
    """A value that the object a config builds refuses (a non-positive size, dims that do not divide...): raised
    by `check_positive`, `fill_child` and every other config check, so callers tell bad input from a bug."""


# ----------------------------------------------------------------------------------------------------
# Type checking of field values.


def _type_name(hint: Any) -> str:
    if hint is _RequiredType:
        return "REQUIRED"
    if isinstance(hint, type):
        if issubclass(hint, ConfigBase) and hint.__qualname__.endswith(".Config"):
            return hint.__qualname__
        return hint.__name__
    return repr(hint).replace("typing.", "").replace("axmini.config.", "")


def _type_error(value: Any, hint: Any) -> str | None:
    """Returns why `value` does not fit `hint`, or None when it fits."""
    if hint is Any or hint is object:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        if any(_type_error(value, arg) is None for arg in args):
            return None
        return f"expected {' | '.join(_type_name(a) for a in args)}, got {_describe(value)}"
    if origin is Literal:
        return None if value in args else f"expected one of {list(args)}, got {value!r}"
    if origin is typing.Annotated:
        return _type_error(value, args[0])
    if origin is type:
        if isinstance(value, type) and (not args or args[0] is Any or issubclass(value, args[0])):
            return None
        return f"expected a subclass of {_type_name(args[0]) if args else 'object'}, got {value!r}"
    if origin in (Callable, typing.Callable) or hint in (Callable, typing.Callable):
        return None if callable(value) else f"expected a callable, got {_describe(value)}"
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        container = origin or hint
        allowed = (list, tuple) if container in (Sequence, typing.Sequence) else (container,)
        if not isinstance(value, allowed) or isinstance(value, str):
            return f"expected {_type_name(hint)}, got {_describe(value)}"
        if not args:
            return None
        if container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                return f"expected a tuple of {len(args)} items, got {len(value)}"
            item_hints = args
        else:
            item_hints = [args[0]] * len(value)
        for i, (item, item_hint) in enumerate(zip(value, item_hints)):
            error = _type_error(item, item_hint)
            if error:
                return f"item [{i}]: {error}"
        return None
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            return f"expected a mapping, got {_describe(value)}"
        if args:
            for key, item in value.items():
                error = _type_error(key, args[0]) or _type_error(item, args[1])
                if error:
                    return f"item [{key!r}]: {error}"
        return None
    if isinstance(hint, TypeVar):
        return None
    if isinstance(hint, type):
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return None
        if hint is int and isinstance(value, bool):
            return f"expected int, got bool {value!r}"
        if isinstance(value, hint):
            return None
        if issubclass(hint, ConfigBase) and isinstance(value, ConfigBase):
            return (
                f"expected a config of the {_type_name(hint)} family, "
                f"got {type(value).__qualname__}{_klass_suffix(value)}"
            )
        return f"expected {_type_name(hint)}, got {_describe(value)}"
    return None  # A typing construct we do not check (e.g. a Protocol): accept.


def _coerce_int_to_float(value: Any, hint: Any) -> Any:
    """An int given for a float field is stored as a float, so configs print and compare alike."""
    if isinstance(value, int) and not isinstance(value, bool):
        allowed = typing.get_args(hint) or (hint,)
        if float in allowed and int not in allowed:
            return float(value)
    return value


def _klass_suffix(value: ConfigBase) -> str:
    klass = getattr(value, "klass", None)
    return f" (builds {_dotted_name(klass)})" if klass is not None else ""


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, ConfigBase) else type(value).__qualname__


# ----------------------------------------------------------------------------------------------------
# The config base.


def _is_config_container(value: Any) -> bool:
    return isinstance(value, (ConfigBase, list, dict, tuple, set))


class ConfigBase:
    """A typed, checked, copy-on-assign record of fields. Subclasses become keyword-only dataclasses."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A config default (or a mutable container) becomes a factory, so no two configs share it.
        for name in cls.__dict__.get("__annotations__", {}):
            default = cls.__dict__.get(name, dataclasses.MISSING)
            if _is_config_container(default):
                setattr(cls, name, dataclasses.field(default_factory=functools.partial(copy.deepcopy, default)))
        dataclasses.dataclass(cls, eq=False, repr=False, kw_only=True)
        cls._hints = None

    @classmethod
    def _field_hints(cls) -> dict[str, Any]:
        if cls.__dict__.get("_hints") is None:
            try:
                hints = typing.get_type_hints(cls)
            except NameError:  # A forward reference not defined yet: check that field later.
                return {}
            cls._hints = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
        return cls._hints

    @classmethod
    def _optional_defaults(cls) -> dict[str, Any]:
        """{name: default} of the fields declared with `optional(...)`."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get("optional")}

    def is_unset_optional(self, name: str) -> bool:
        """Whether `name` is an optional feature's field that holds its default (left out of `debug_string`)."""
        defaults = self._optional_defaults()
        return name in defaults and getattr(self, name) == defaults[name]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        if getattr(self, "_frozen", False):
            raise FrozenConfigError(
                f"{type(self).__qualname__}.{name}: this config belongs to a built object and cannot "
                f"change; use clone({name}=...) to derive a new config"
            )
        names = self.field_names()
        if name not in names:
            raise UnknownFieldError(_unknown_field_message(self, name, names))
        hint = self._field_hints().get(name, Any)
        error = _type_error(value, hint)
        if error:
            raise ConfigTypeError(f"{type(self).__qualname__}.{name}: {error}")
        if _is_config_container(value):
            value = copy.deepcopy(value)
            _unfreeze(value)
        object.__setattr__(self, name, _coerce_int_to_float(value, hint))

    def set(self: C, **kwargs: Any) -> C:
        """Sets fields in place and returns the config, for chaining."""
        for name, value in kwargs.items():
            setattr(self, name, value)
        return self

    def clone(self: C, **kwargs: Any) -> C:
        """Returns a mutable deep copy with `kwargs` set."""
        result = copy.deepcopy(self)
        _unfreeze(result)
        return result.set(**kwargs)

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.field_names()]

    def visit(self, fn: Callable[[str, Any], None], prefix: str = "") -> None:
        """Calls `fn(path, value)` on every field, depth first; configs are visited before their fields."""
        visit(self, fn, prefix)

    def debug_string(self) -> str:
        """One `path: value` line per leaf, in field order: the golden text of a config."""
        return "\n".join(f"{path}: {_format_leaf(value)}" for path, value in self.to_flat_dict().items())

    def to_flat_dict(self) -> dict[str, Any]:
        """Maps the dotted path of every leaf (non-config value) to its value, optional fields at their default
        (`optional`) left out."""
        flat: dict[str, Any] = {}

        def add_leaf(path: str, value: Any) -> None:
            if not _contains_config(value):
                flat[path] = value

        visit(self, add_leaf, omit_unset_optional=True)
        return flat

    def freeze(self: C) -> C:
        """Returns a frozen deep copy: what a built object keeps (hashable, read-only)."""
        result = copy.deepcopy(self)
        _set_frozen(result, True)
        return result

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.items() == other.items()

    def __hash__(self) -> int:
        if not getattr(self, "_frozen", False):
            raise TypeError(f"{type(self).__qualname__} is mutable and unhashable; use freeze()")
        if getattr(self, "_hash", None) is None:
            object.__setattr__(self, "_hash", hash((type(self), _hashable(self.items()))))
        return self._hash

    def __repr__(self) -> str:
        return (
            f"{type(self).__qualname__}{_klass_suffix(self)}(\n  "
            + "\n  ".join(self.debug_string().splitlines())
            + "\n)"
        )


def _unknown_field_message(cfg: ConfigBase, name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{type(cfg).__qualname__}{_klass_suffix(cfg)} has no field {name!r}{hint} (fields: {', '.join(names)})"


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, ConfigBase):
        return (type(value), _hashable(value.items()))
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _children(value: Any, omit_unset_optional: bool = False) -> Iterator[tuple[str, Any]]:
    """The (path suffix, child) pairs of a config or a container (without unset optional fields, if asked)."""
    if isinstance(value, ConfigBase):
        for name, child in value.items():
            if not (omit_unset_optional and value.is_unset_optional(name)):
                yield f".{name}", child
    elif isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            yield f"[{i}]", child
    elif isinstance(value, dict):
        for key, child in value.items():
            yield f"[{key!r}]", child


def _contains_config(value: Any) -> bool:
    if isinstance(value, ConfigBase):
        return True
    return isinstance(value, (list, tuple, dict)) and any(_contains_config(c) for _, c in _children(value))


def visit(value: Any, fn: Callable[[str, Any], None], prefix: str = "", omit_unset_optional: bool = False) -> None:
    """Calls `fn(path, node)` on `value`'s fields and, recursively, on configs and lists of configs."""
    for suffix, child in _children(value, omit_unset_optional):
        path = (prefix + suffix).lstrip(".")
        fn(path, child)
        if _contains_config(child):
            visit(child, fn, path, omit_unset_optional)


def _set_frozen(value: Any, frozen: bool) -> None:
    if isinstance(value, ConfigBase):
        object.__setattr__(value, "_frozen", frozen)
        object.__setattr__(value, "_hash", None)
    for _, child in _children(value):
        _set_frozen(child, frozen)


def _unfreeze(value: Any) -> None:
    _set_frozen(value, False)


def _dotted_name(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    return repr(obj)


def _format_leaf(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, functools.partial):
        args = [_format_leaf(a) for a in value.args] + [f"{k}={_format_leaf(v)}" for k, v in value.keywords.items()]
        args = ", ".join(args)
        return f"functools.partial({_format_leaf(value.func)}, {args})"
    if isinstance(value, type) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return _dotted_name(value)
    if isinstance(value, (list, tuple)):
        items = ", ".join(_format_leaf(v) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_format_leaf(v)}" for k, v in value.items()) + "}"
    if callable(value) and not isinstance(value, ConfigBase):
        return _dotted_name(value)
    return repr(value)


# ----------------------------------------------------------------------------------------------------
# Configs that build things.


class InstantiableConfig(ConfigBase):
    """A config that can build an object: `instantiate(**kwargs)`."""

    def instantiate(self, **kwargs: Any) -> Any:
        raise NotImplementedError(type(self))

    def required_fields_missing(self) -> list[str]:
        """Paths of this config's own REQUIRED fields (not those of child configs, which parents fill)."""
        return [config_path(self, name) for name, value in self.items() if value is REQUIRED]

    def _check_required(self, provided: Mapping[str, Any] = ()) -> None:
        missing = [path for path in self.required_fields_missing() if path.rsplit(".", 1)[-1] not in provided]
        if missing:
            target = _format_leaf(getattr(self, "klass", None) or getattr(self, "fn", None))
            raise RequiredFieldMissingError(
                f"cannot build {target}: required field(s) not set: {', '.join(missing)} "
                f"(set them in the config, e.g. with --set {missing[0]}=VALUE)"
            )


def _stamp_paths(cfg: ConfigBase, prefix: str) -> None:
    """Records each sub-config's dotted path in the tree, so errors raised while building name it."""
    object.__setattr__(cfg, "_tree_path", prefix)

    def stamp(path: str, value: Any) -> None:
        if isinstance(value, ConfigBase):
            object.__setattr__(value, "_tree_path", path)

    visit(cfg, stamp, prefix)


def config_path(cfg: ConfigBase, field: str | None = None) -> str:
    """The dotted path of `cfg` (or of its `field`) in the config tree being built: what an error names.

    Building a config records the path of each of its sub-configs, relative to the config built first (the root), so
    a path is what `--set` takes (`model.stack.layer.self_attention.num_heads`). A field of the root is its bare name
    (`max_step`); the root itself is named by its class (`Decoder`).
    """
    base = getattr(cfg, "_tree_path", "")
    if field is None:
        return base or type(cfg).__qualname__.removesuffix(".Config")
    return f"{base}.{field}" if base else field


def check_positive(cfg: ConfigBase, *fields: str) -> None:
    """Refuses any of `fields` of `cfg` that is set (not None) and not > 0, naming it by its path."""
    for name in fields:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ConfigValueError(f"{config_path(cfg, name)}={value} must be positive")


def check_non_negative(cfg: ConfigBase, *fields: str) -> None:
    """Refuses any of `fields` of `cfg` that is set (not None) and negative, naming it by its path."""
    for name in fields:
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ConfigValueError(f"{config_path(cfg, name)}={value} must be >= 0")


def fill_child(child: C, *, parent: ConfigBase, **values: Any) -> C:
    """A copy of the `child` config with the fields its `parent` owns (the dims they share) set to `values`.

    A field already set to another value is a conflict (e.g. qk_norm.input_dim != head_dim): it is refused, never
    silently overwritten. Every parent writes its children's dims through here.
    """
    result = child.clone()
    for name, value in values.items():
        current = getattr(result, name, REQUIRED)  # An unknown name is refused by the assignment below.
        if current is not REQUIRED and current != value:
            raise ConfigValueError(
                f"{config_path(child, name)}={current!r} conflicts with {value!r} required by {config_path(parent)}; "
                f"leave {name} unset (the parent fills it) or make it equal"
            )
        setattr(result, name, value)
    return result


class Configurable:
    """Base of every object built from a config. `Foo.default_config()` returns a `Foo.Config`."""

    class Config(InstantiableConfig):
        klass: type | None = None

        def instantiate(self, **kwargs: Any) -> Any:
            if self.klass is None:
                raise RequiredFieldMissingError(f"{type(self).__qualname__}.klass is not set; use Foo.default_config()")
            _stamp_paths(self, getattr(self, "_tree_path", ""))
            self._check_required()
            return self.klass(self, **kwargs)

    @classmethod
    def default_config(cls) -> Config:
        return cls.Config(klass=cls)

    @classmethod
    def matches(cls, cfg: Any) -> bool:
        """Whether `cfg` builds this class or a subclass of it: how the fillers of a slot are found in a tree
        (`find_configs(tree, Attention.matches)`), by class rather than by the fields a config happens to have."""
        klass = getattr(cfg, "klass", None)
        return isinstance(cfg, Configurable.Config) and isinstance(klass, type) and issubclass(klass, cls)

    def __init__(self, cfg: Configurable.Config):
        if not isinstance(cfg, self.Config):
            expected, got = self.Config.__qualname__, type(cfg).__qualname__
            raise ConfigTypeError(f"{type(self).__name__} needs a {expected}, got {got}")
        path = getattr(cfg, "_tree_path", "")
        self._config = cfg.freeze()
        _stamp_paths(self._config, path)

    @property
    def config(self) -> Config:
        """The frozen config this object was built from."""
        return self._config


# ----------------------------------------------------------------------------------------------------
# Wrapping third-party callables.


class FunctionConfigBase(InstantiableConfig):
    """A config whose fields are the parameters of a callable; `instantiate(**kw)` calls it."""

    fn: Callable = None  # type: ignore[assignment]

    def instantiate(self, **kwargs: Any) -> Any:
        self._check_required(kwargs)
        args = {name: value for name, value in self.items() if name != "fn" and value is not REQUIRED}
        args = {name: maybe_instantiate(value) for name, value in args.items()}
        args.update(kwargs)
        return self.fn(**args)


_SIMPLE_TYPES = (int, float, bool, str)


def _simple_hint(annotation: Any) -> Any:
    """Keeps a parameter annotation when it is one we can check; third-party aliases become Any."""
    if annotation in _SIMPLE_TYPES:
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if all(a in _SIMPLE_TYPES or a is type(None) for a in args):
            return annotation
    return Any


@functools.cache
def _function_config_class(fn: Callable) -> type[FunctionConfigBase]:
    signature = inspect.signature(fn)
    try:
        annotations = typing.get_type_hints(fn)
    except Exception:  # Unresolvable third-party annotations: no checking for those parameters.
        annotations = {}
    params = list(signature.parameters.values())
    fields = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = REQUIRED if p.default is p.empty else p.default
        hint = _simple_hint(annotations.get(p.name, Any))
        if default is REQUIRED:
            hint = Union[hint, _RequiredType] if hint is not Any else Any
        elif default is None and hint is not Any:
            hint = Union[hint, None]
        if _is_config_container(default):
            fields.append((p.name, hint, dataclasses.field(default_factory=functools.partial(copy.deepcopy, default))))
        else:
            fields.append((p.name, hint, dataclasses.field(default=default)))
    name = f"{getattr(fn, '__name__', 'fn')}_Config"
    namespace = {"__annotations__": {n: h for n, h, _ in fields}, **{n: f for n, _, f in fields}}
    return types.new_class(name, (FunctionConfigBase,), exec_body=lambda ns: ns.update(namespace))


def config_for_function(fn: Callable, **kwargs: Any) -> FunctionConfigBase:
    """A config whose fields are `fn`'s parameters (those without default are REQUIRED)."""
    return _function_config_class(fn)(fn=fn).set(**kwargs)


def config_for_class(cls: type, **kwargs: Any) -> FunctionConfigBase:
    """A config whose fields are the parameters of `cls.__init__`; `instantiate()` returns `cls(...)`."""
    return _function_config_class(cls)(fn=cls).set(**kwargs)


def maybe_instantiate(value: Any, **kwargs: Any) -> Any:
    """Resolves a deferred value: a function config is called with `kwargs`; anything else is returned."""
    if isinstance(value, InstantiableConfig):
        return value.instantiate(**kwargs)
    return value


# ----------------------------------------------------------------------------------------------------
# Rewriting config trees: the mechanism of every feature patch.


class ConfigModifier(Configurable):
    """A `cfg -> cfg` rewrite of a config tree, itself configured: the unit of a feature patch."""

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        raise NotImplementedError(type(self))


class ChainConfigModifier(ConfigModifier):
    """Applies a list of modifiers in order."""

    class Config(ConfigModifier.Config):
        modifiers: list[ConfigModifier.Config] = []

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        for modifier_cfg in self.config.modifiers:
            cfg = modifier_cfg.instantiate()(cfg)
        return cfg


def _class_matches(cfg: Any, target: type | Callable[[ConfigBase], bool]) -> bool:
    if not isinstance(cfg, ConfigBase):
        return False
    if isinstance(target, type):
        return getattr(cfg, "klass", None) is target or (issubclass(target, ConfigBase) and type(cfg) is target)
    return bool(target(cfg))


def find_configs(cfg: ConfigBase, target: type | Callable[[ConfigBase], bool]) -> list[tuple[str, ConfigBase]]:
    """(path, config) of every config in the tree that builds `target` (a class, or a predicate)."""
    found = [("", cfg)] if _class_matches(cfg, target) else []
    visit(cfg, lambda path, value: found.append((path, value)) if _class_matches(value, target) else None)
    return found


def map_configs(cfg: C, target: type | Callable[[ConfigBase], bool], fn: Callable[[ConfigBase], ConfigBase]) -> C:
    """Returns a copy of the tree with every matching config `c` replaced by `fn(c)` (lists included).

    Matching is outermost first: the replacement's own children are not visited again.
    """
    if _class_matches(cfg, target):
        return fn(copy.deepcopy(cfg))
    result = copy.deepcopy(cfg)
    _unfreeze(result)
    _map_children(result, target, fn)
    return result


def _map_children(node: Any, target: Any, fn: Callable[[ConfigBase], ConfigBase]) -> None:
    for suffix, child in list(_children(node)):
        if _class_matches(child, target):
            new = fn(child)
        else:
            _map_children(child, target, fn)
            continue
        if isinstance(node, ConfigBase):
            setattr(node, suffix[1:], new)
        elif isinstance(node, list):
            node[int(suffix[1:-1])] = new
        elif isinstance(node, dict):
            node[ast.literal_eval(suffix[1:-1])] = new
        else:
            raise ConfigTypeError(f"cannot replace a config inside a tuple at {suffix}; use a list")


def replace_config(
    cfg: C,
    *,
    target: type | Callable[[ConfigBase], bool],
    new: ConfigBase,
    keep_fields: bool | Sequence[str] = True,
) -> C:
    """Swaps every config that builds `target` for a copy of `new`, anywhere in the tree.

    With `keep_fields=True` the fields both configs have (other than `klass`) carry over from the old
    config; a list of names carries over just those.
    """

    def swap(old: ConfigBase) -> ConfigBase:
        result = new.clone()
        names = set(result.field_names()) & set(old.field_names()) - {"klass"}
        if keep_fields is not True:
            names &= set(keep_fields or ())
        for name in sorted(names, key=result.field_names().index):
            try:
                setattr(result, name, getattr(old, name))
            except ConfigTypeError as e:
                raise ConfigTypeError(f"replace_config: cannot carry field {name!r} over: {e}") from None
        return result

    return map_configs(cfg, target, swap)


# ----------------------------------------------------------------------------------------------------
# Overrides by dotted path, e.g. from the command line.


def _field_hint(parent: Any, key: str | int, hint_of_parent: Any) -> Any:
    if isinstance(parent, ConfigBase):
        return parent._field_hints().get(key, Any)
    args = [a for a in typing.get_args(hint_of_parent) if a is not _RequiredType and a is not type(None)]
    container = next((a for a in args if typing.get_origin(a) in (list, tuple, Sequence)), hint_of_parent)
    item_args = typing.get_args(container)
    return item_args[0] if item_args else Any


def parse_value(text: str, hint: Any, path: str) -> Any:
    """Parses command-line text for a field declared as `hint` (ints, floats, bools, enums, lists...)."""
    candidates: list[Any] = []
    enum_types = [a for a in (typing.get_args(hint) or (hint,)) if isinstance(a, type) and issubclass(a, enum.Enum)]
    for enum_type in enum_types:
        name = text.split(".")[-1]
        if name in enum_type.__members__:
            candidates.append(enum_type[name])
    lowered = {"true": True, "false": False, "none": None, "null": None, "required": REQUIRED}
    if text.lower() in lowered:
        candidates.append(lowered[text.lower()])
    try:
        candidates.append(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        pass
    candidates.append(text)
    for value in candidates:
        if isinstance(value, tuple) and _type_error(value, hint) and not _type_error(list(value), hint):
            value = list(value)
        if _type_error(value, hint) is None:
            return value
    raise ConfigTypeError(f"--set {path}={text}: {_type_error(candidates[0], hint)}")


def _resolve(cfg: ConfigBase, path: str) -> tuple[Any, str | int, Any]:
    """Walks `path` and returns (parent node, last key, declared type of the target)."""
    try:
        parts = dotted_path_parser.split(path)
    except ValueError:
        raise UnknownFieldError(f"cannot parse config path {path!r} (expected e.g. model.decoder.num_layers)") from None
    node: Any = cfg
    hint: Any = type(cfg)
    walked = ""
    for i, key in enumerate(parts):
        if isinstance(node, ConfigBase):
            if not isinstance(key, str) or key not in node.field_names():
                message = _unknown_field_message(node, str(key), node.field_names())
                raise UnknownFieldError(f"{path}: at {walked or '<root>'}: {message}")
        elif isinstance(node, (list, tuple)):
            if not isinstance(key, int) or not -len(node) <= key < len(node):
                raise UnknownFieldError(f"{path}: {walked} has {len(node)} items; index {key!r} is out of range")
        elif isinstance(node, dict):
            if key not in node:
                raise UnknownFieldError(f"{path}: {walked} has no key {key!r} (keys: {list(node)})")
        else:
            raise UnknownFieldError(f"{path}: {walked} is a {type(node).__name__} value, not a config")
        hint = _field_hint(node, key, hint)
        if i == len(parts) - 1:
            return node, key, hint
        node = getattr(node, key) if isinstance(node, ConfigBase) else node[key]
        walked += f".{key}" if isinstance(key, str) else f"[{key}]"
        walked = walked.lstrip(".")
    raise UnknownFieldError(f"empty config path {path!r}")


def get_path(cfg: ConfigBase, path: str) -> Any:
    """The value at a dotted path (`model.decoder.layers[0].num_heads`)."""
    parent, key, _ = _resolve(cfg, path)
    return getattr(parent, key) if isinstance(parent, ConfigBase) else parent[key]


def set_path(cfg: ConfigBase, path: str, value: Any) -> None:
    """Sets the value at a dotted path, with the field's type check."""
    parent, key, hint = _resolve(cfg, path)
    if isinstance(parent, ConfigBase):
        setattr(parent, key, value)
        return
    error = _type_error(value, hint)
    if error:
        raise ConfigTypeError(f"{path}: {error}")
    if isinstance(parent, tuple):
        raise ConfigTypeError(f"{path}: cannot assign into a tuple; set the whole field instead")
    parent[key] = value


def apply_overrides(cfg: C, overrides: Sequence[str]) -> C:
    """Applies `path=value` strings (as given to `--set`) to a copy of `cfg`, parsing each by type."""
    result = cfg.clone()
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep:
            raise ConfigTypeError(f"--set {override!r}: expected PATH=VALUE, e.g. model.decoder.num_layers=4")
        path = path.strip()
        _, _, hint = _resolve(result, path)
        set_path(result, path, parse_value(text.strip(), hint, path))
    return result
