"""The typed config system: checked assignment, values semantics, paths in errors, tree rewriting, overrides."""

import enum
import math

import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from axmini.config import (
    REQUIRED,
    ChainConfigModifier,
    ConfigError,
    ConfigModifier,
    ConfigTypeError,
    Configurable,
    ConfigValueError,
    FrozenConfigError,
    FunctionConfigBase,
    Required,
    RequiredFieldMissingError,
    UnknownFieldError,
    apply_overrides,
    check_non_negative,
    check_positive,
    config_for_class,
    config_for_function,
    config_path,
    fill_child,
    find_configs,
    get_path,
    maybe_instantiate,
    replace_config,
)


class Activation(enum.Enum):
    RELU = "relu"
    GELU = "gelu"


def scale_dim(scale: float, input_dim: int) -> int:
    return int(scale * input_dim)


class Leaf(Configurable):
    class Config(Configurable.Config):
        input_dim: Required[int] = REQUIRED
        hidden_dim: Required[int | FunctionConfigBase] = REQUIRED
        rate: float = 0.5
        activation: Activation = Activation.RELU

    def __init__(self, cfg):
        super().__init__(cfg)
        self.hidden_dim = maybe_instantiate(self.config.hidden_dim, input_dim=self.config.input_dim)


class OtherLeaf(Configurable):
    class Config(Configurable.Config):
        input_dim: Required[int] = REQUIRED
        rate: float = 0.25
        extra: str = "x"


class Middle(Configurable):
    class Config(Configurable.Config):
        input_dim: Required[int] = REQUIRED
        leaf: Configurable.Config = Leaf.default_config()
        layers: list[Configurable.Config] = []

    def __init__(self, cfg):
        super().__init__(cfg)
        self.leaf = self.config.leaf.clone(input_dim=self.config.input_dim).instantiate()
        self.layers = [c.instantiate() for c in self.config.layers]


class Root(Configurable):
    class Config(Configurable.Config):
        middle: Middle.Config = Middle.default_config()
        name: str = "root"
        sizes: tuple[int, ...] = (1, 2)
        table: dict[str, float] = {}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.middle = self.config.middle.instantiate()


def test_set_returns_config_and_clone_copies():
    cfg = Leaf.default_config()
    assert cfg.set(input_dim=3) is cfg
    other = cfg.clone(input_dim=4)
    assert (cfg.input_dim, other.input_dim) == (3, 4)


def test_unknown_field_names_class_and_suggests_closest():
    with pytest.raises(UnknownFieldError, match=r"Leaf.Config .*has no field 'hiden_dim'; did you mean 'hidden_dim'"):
        Leaf.default_config().set(hiden_dim=3)


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("input_dim", "3", r"Leaf.Config.input_dim: expected int \| REQUIRED, got str '3'"),
        ("input_dim", True, r"expected int \| REQUIRED, got bool"),
        ("rate", "fast", r"Leaf.Config.rate: expected float, got str"),
        ("activation", "relu", r"expected Activation \(one of RELU, GELU\), got str"),
    ],
)
def test_wrong_type_is_refused_with_expectation(field, value, expected):
    with pytest.raises(ConfigTypeError, match=expected):
        Leaf.default_config().set(**{field: value})


def test_wrong_type_inside_list_and_dict_is_refused():
    with pytest.raises(ConfigTypeError, match=r"Root.Config.sizes: item \[1\]: expected int, got str"):
        Root.default_config().set(sizes=(1, "2"))
    with pytest.raises(ConfigTypeError, match=r"Root.Config.table: item \['a'\]: expected float, got str"):
        Root.default_config().set(table={"a": "b"})


def test_nested_config_of_wrong_family_is_refused():
    with pytest.raises(ConfigTypeError, match=r"Root.Config.middle: expected a config of the Middle.Config family"):
        Root.default_config().set(middle=Leaf.default_config())


def test_int_for_float_field_is_stored_as_float():
    assert Leaf.default_config().set(rate=1).rate == 1.0
    assert isinstance(Leaf.default_config().set(rate=1).rate, float)


def test_assigning_a_config_copies_it():
    leaf = Leaf.default_config().set(input_dim=3)
    middle = Middle.default_config().set(leaf=leaf)
    leaf.input_dim = 5
    assert middle.leaf.input_dim == 3


def test_default_child_configs_are_not_shared():
    a, b = Middle.default_config(), Middle.default_config()
    a.leaf.rate = 0.9
    assert b.leaf.rate == 0.5


def test_built_object_cannot_change_its_config():
    leaf = Leaf.default_config().set(input_dim=2, hidden_dim=3).instantiate()
    with pytest.raises(FrozenConfigError, match="use clone"):
        leaf.config.rate = 0.1
    assert hash(leaf.config) == hash(leaf.config.clone().freeze())


def test_required_deep_in_three_level_tree_reports_full_path():
    cfg = Root.default_config()
    cfg.middle.set(input_dim=4)  # leaf.hidden_dim is still REQUIRED
    with pytest.raises(RequiredFieldMissingError, match=r"required field\(s\) not set: middle\.leaf\.hidden_dim"):
        cfg.instantiate()


def test_required_inside_list_reports_index_path():
    cfg = Root.default_config()
    cfg.middle.set(input_dim=4)
    cfg.middle.leaf.set(hidden_dim=8)
    cfg.middle.layers = [OtherLeaf.default_config().set(input_dim=1), OtherLeaf.default_config()]
    with pytest.raises(RequiredFieldMissingError, match=r"middle\.layers\[1\]\.input_dim"):
        cfg.instantiate()


def test_deferred_value_filled_in_by_parent():
    cfg = Middle.default_config().set(input_dim=6)
    cfg.leaf.hidden_dim = config_for_function(scale_dim).set(scale=1.5)
    assert cfg.instantiate().leaf.hidden_dim == 9


def test_config_for_function_wraps_optax_and_schedules():
    schedule = config_for_function(optax.cosine_decay_schedule).set(init_value=1.0, decay_steps=10)
    opt = config_for_function(optax.adamw).set(learning_rate=schedule, weight_decay=0.1)
    assert "learning_rate.fn: optax.schedules._schedule.cosine_decay_schedule" in opt.debug_string()
    assert opt.b1 == 0.9
    tx = opt.instantiate()
    assert hasattr(tx, "update")
    with pytest.raises(RequiredFieldMissingError, match="decay_steps"):
        config_for_function(optax.cosine_decay_schedule).set(init_value=1.0).instantiate()


def test_config_for_class_builds_instances():
    cfg = config_for_class(Activation).set(value="gelu")
    assert cfg.instantiate() is Activation.GELU


def test_debug_string_prints_dotted_names_and_list_paths():
    cfg = Root.default_config()
    cfg.middle.layers = [OtherLeaf.default_config()]
    text = cfg.debug_string()
    assert text.splitlines()[0] == f"klass: {Root.__module__}.Root"
    assert "middle.leaf.activation: Activation.RELU" in text
    assert "middle.layers[0].extra: 'x'" in text
    assert "middle.leaf.hidden_dim: REQUIRED" in text


def test_replace_config_swaps_everywhere_including_lists_and_keeps_shared_fields():
    cfg = Root.default_config()
    cfg.middle.leaf.set(input_dim=3, rate=0.75)
    cfg.middle.layers = [Leaf.default_config().set(input_dim=7), OtherLeaf.default_config()]
    new = replace_config(cfg, target=Leaf, new=OtherLeaf.default_config().set(extra="y"))
    assert [type(c) for _, c in find_configs(new, Leaf)] == []
    assert [path for path, _ in find_configs(new, OtherLeaf)] == ["middle.leaf", "middle.layers[0]", "middle.layers[1]"]
    assert (new.middle.leaf.input_dim, new.middle.leaf.rate, new.middle.leaf.extra) == (3, 0.75, "y")
    assert new.middle.layers[0].input_dim == 7
    assert new.middle.layers[1].extra == "x"  # was already OtherLeaf: untouched
    assert new.name == cfg.name and cfg.middle.leaf.klass is Leaf  # the original is unchanged


def test_replace_config_with_selected_fields_only():
    cfg = Middle.default_config()
    cfg.leaf.set(input_dim=3, rate=0.75)
    new = replace_config(cfg, target=Leaf, new=OtherLeaf.default_config(), keep_fields=["input_dim"])
    assert (new.leaf.input_dim, new.leaf.rate) == (3, 0.25)


class ScaleRate(ConfigModifier):
    class Config(ConfigModifier.Config):
        factor: float = 2.0

    def __call__(self, cfg):
        def scale(leaf):
            return leaf.set(rate=leaf.rate * self.config.factor)

        from axmini.config import map_configs

        return map_configs(cfg, Leaf, scale)


def test_chained_modifiers_apply_in_order():
    chain = ChainConfigModifier.default_config().set(
        modifiers=[ScaleRate.default_config(), ScaleRate.default_config().set(factor=3.0)]
    )
    assert chain.instantiate()(Middle.default_config()).leaf.rate == pytest.approx(3.0)


def test_overrides_parse_by_field_type_with_list_indices():
    cfg = Root.default_config()
    cfg.middle.layers = [Leaf.default_config()]
    new = apply_overrides(
        cfg,
        [
            "middle.input_dim=4",
            "middle.leaf.rate=3e-4",
            "middle.layers[0].activation=GELU",
            "name=hello world",
            "sizes=(3, 4, 5)",
            "table={'a': 1}",
        ],
    )
    assert new.middle.input_dim == 4 and new.middle.leaf.rate == 3e-4
    assert new.middle.layers[0].activation is Activation.GELU
    assert new.name == "hello world" and new.sizes == (3, 4, 5) and new.table == {"a": 1}
    assert get_path(new, "middle.layers[0].activation") is Activation.GELU
    assert cfg.middle.input_dim is REQUIRED


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("middle.leaf.rat=1", UnknownFieldError, r"middle.leaf.rat: at middle.leaf: .*did you mean 'rate'"),
        ("midle.input_dim=1", UnknownFieldError, r"did you mean 'middle'"),
        ("middle.layers[3].rate=1", UnknownFieldError, r"middle.layers has 0 items"),
        ("middle.input_dim=four", ConfigTypeError, r"--set middle.input_dim=four: expected int"),
        ("middle.leaf.activation=SWISH", ConfigTypeError, r"expected Activation"),
        ("middle.input_dim", ConfigTypeError, r"expected PATH=VALUE"),
        ("name.upper=1", UnknownFieldError, r"is a str value, not a config"),
    ],
)
def test_bad_overrides_raise_clear_errors(override, error, message):
    with pytest.raises(error, match=message):
        apply_overrides(Root.default_config(), [override])


# ----------------------------------------------------------------------------------------------------
# Property-based round trips.

_names = st.text(alphabet="abcdefghij _-", min_size=0, max_size=12)
_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    rate=_floats,
    input_dim=st.integers(-(10**9), 10**9),
    name=_names,
    sizes=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
)
def test_clone_equals_original_and_debug_string_is_stable(rate, input_dim, name, sizes):
    cfg = Root.default_config().set(name=name, sizes=tuple(sizes))
    cfg.middle.set(input_dim=input_dim)
    cfg.middle.leaf.set(rate=rate)
    clone = cfg.clone()
    assert clone == cfg and clone is not cfg
    assert clone.debug_string() == cfg.debug_string()
    assert clone.to_flat_dict() == cfg.to_flat_dict()


@settings(max_examples=60, deadline=None)
@given(rate=_floats, input_dim=st.integers(-(10**6), 10**6), name=_names)
def test_debug_string_values_round_trip_through_overrides(rate, input_dim, name):
    cfg = Root.default_config().set(name=name)
    cfg.middle.set(input_dim=input_dim)
    cfg.middle.leaf.set(rate=rate)
    overrides = [
        f"{path}={value!r}" if isinstance(value, str) else f"{path}={value}"
        for path, value in cfg.to_flat_dict().items()
        if path in ("name", "middle.input_dim", "middle.leaf.rate")
    ]
    rebuilt = apply_overrides(Root.default_config(), overrides)
    assert rebuilt.middle.input_dim == input_dim and rebuilt.name == name
    assert rebuilt.middle.leaf.rate == rate or (math.isclose(rebuilt.middle.leaf.rate, rate))


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_visit_reaches_every_leaf_once(values):
    cfg = Middle.default_config()
    cfg.layers = [OtherLeaf.default_config().set(rate=v) for v in values]
    seen = []
    cfg.visit(lambda path, value: seen.append(path))
    assert len(seen) == len(set(seen))
    assert set(cfg.to_flat_dict()) <= set(seen)
    assert [cfg.to_flat_dict()[f"layers[{i}].rate"] for i in range(len(values))] == values


# ----------------------------------------------------------------------------------------------------
# Services for layers: config paths, checks, filling a child's dims, recognising a slot's fillers.


class Recorder(Configurable):
    """Records the config path of itself and of a field, as seen while it is built."""

    class Config(Configurable.Config):
        size: int = 1
        child: Configurable.Config | None = None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.paths = (config_path(self.config), config_path(self.config, "size"))
        self.child = self.config.child.instantiate() if self.config.child is not None else None


def test_config_path_is_the_path_from_the_root_being_built():
    inner = Recorder.default_config()
    root = Recorder.default_config().set(child=Recorder.default_config().set(child=inner)).instantiate()
    assert root.paths == ("Recorder", "size")  # The root: its class, and its fields by their bare names.
    assert root.child.paths == ("child", "child.size")
    assert root.child.child.paths == ("child.child", "child.child.size")
    assert config_path(Leaf.default_config(), "rate") == "rate"  # Never built: a root.


def test_check_positive_names_the_first_bad_field_by_its_path_and_skips_none():
    middle = Middle.default_config().set(input_dim=0)
    with pytest.raises(ConfigValueError, match=r"^input_dim=0 must be positive$") as info:
        check_positive(middle, "input_dim")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    check_positive(Recorder.default_config().set(child=None), "size", "child")  # None: not set, accepted.
    check_non_negative(OtherLeaf.default_config().set(rate=0.0), "rate")
    with pytest.raises(ConfigValueError, match=r"^rate=-0.25 must be >= 0$"):
        check_non_negative(OtherLeaf.default_config().set(rate=-0.25), "rate")


def test_a_layer_check_names_the_field_by_its_full_path():
    class Checked(Configurable):
        class Config(Configurable.Config):
            size: int = 1

        def __init__(self, cfg):
            super().__init__(cfg)
            check_positive(self.config, "size")

    cfg = Recorder.default_config().set(child=Recorder.default_config().set(child=Checked.default_config()))
    cfg.child.child.size = -1
    with pytest.raises(ConfigValueError, match=r"^child\.child\.size=-1 must be positive$"):
        cfg.instantiate()


def test_fill_child_fills_required_fields_and_refuses_conflicts():
    parent = Middle.default_config().set(input_dim=4)
    filled = fill_child(parent.leaf, parent=parent, input_dim=4)
    assert filled.input_dim == 4 and parent.leaf.input_dim is REQUIRED  # A copy: the parent's child is untouched.
    assert fill_child(filled, parent=parent, input_dim=4).input_dim == 4  # An equal value is no conflict.
    with pytest.raises(ConfigValueError, match=r"input_dim=4 conflicts with 8 required by Middle; leave input_dim"):
        fill_child(filled, parent=parent, input_dim=8)
    with pytest.raises(UnknownFieldError, match="has no field 'input_dims'"):
        fill_child(parent.leaf, parent=parent, input_dims=4)


def test_matches_recognises_a_class_and_its_subclasses_not_field_names():
    class SubLeaf(Leaf):
        pass

    class LookAlike(Configurable):  # Has every field of Leaf.Config, but builds something else.
        Config = Leaf.Config

    assert Leaf.matches(Leaf.default_config()) and Leaf.matches(SubLeaf.default_config())
    assert not SubLeaf.matches(Leaf.default_config())
    assert not Leaf.matches(LookAlike.default_config()) and not Leaf.matches(OtherLeaf.default_config())
    assert not Leaf.matches(None) and not Leaf.matches(config_for_function(scale_dim))
    tree = Middle.default_config().set(layers=[SubLeaf.default_config(), LookAlike.default_config()])
    assert [path for path, _ in find_configs(tree, Leaf.matches)] == ["leaf", "layers[0]"]
