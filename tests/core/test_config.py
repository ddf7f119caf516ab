from dataclasses import dataclass

import pytest

from optlab.core.config import (
    METHODS,
    MethodRegistry,
    Registry,
    config_from_dict,
    config_to_dict,
    configurable,
    option,
    require_finite,
    require_positive,
)
from optlab.errors import OptlabError


@configurable("test-toy", version=2)
@dataclass(frozen=True)
class ToyConfig:
    sparsity: float = option(0.5, "fraction pruned")
    pattern: str = option("unstructured", "pattern")
    layers: tuple[int, ...] = option((0, 1), "layers")

    def __post_init__(self) -> None:
        require_finite(self, "sparsity")


@configurable("test-outer")
@dataclass(frozen=True)
class OuterConfig:
    inner: ToyConfig = option(ToyConfig(), "nested")  # noqa: RUF009  (frozen: safe to share)
    steps: int = option(3, "steps")

    def __post_init__(self) -> None:
        require_positive(self, "steps")


@dataclass(frozen=True)
class Unregistered:
    x: int = 1


def test_registry_finds_names_and_suggests_close_ones() -> None:
    methods: Registry[str] = Registry("method")
    methods.register("wanda")("W")
    methods.register("sparsegpt")("S")
    assert methods.get("wanda") == "W" and list(methods) == ["sparsegpt", "wanda"]
    with pytest.raises(OptlabError, match=r"unknown method 'wandaa'\. Did you mean 'wanda'"):
        methods.get("wandaa")
    with pytest.raises(ValueError, match="registered twice"):
        methods.register("wanda")("again")


def test_config_round_trip_with_type_tag_and_version() -> None:
    config = ToyConfig(sparsity=0.6, layers=(3,))
    data = config_to_dict(config)
    assert data == {"type": "test-toy", "version": 2, "sparsity": 0.6,
                    "pattern": "unstructured", "layers": [3]}  # fmt: skip
    assert config_from_dict(data) == config  # lists from YAML become tuples again
    assert config_from_dict({"sparsity": 0.6, "layers": [3]}, ToyConfig) == config
    nested = OuterConfig(inner=config, steps=5)
    assert config_to_dict(nested)["inner"]["type"] == "test-toy"
    assert config_from_dict(config_to_dict(nested)) == nested


def test_config_from_dict_refuses_what_it_does_not_know() -> None:
    with pytest.raises(OptlabError, match="Did you mean 'sparsity'"):
        config_from_dict({"sparsit": 0.5}, ToyConfig)
    with pytest.raises(OptlabError, match=r"unknown config type 'os\.system'"):
        config_from_dict({"type": "os.system", "command": "rm -rf /"})
    with pytest.raises(OptlabError, match="version 3 is not known"):
        config_from_dict({"type": "test-toy", "version": 3})
    with pytest.raises(OptlabError, match="'test-toy' is not a OuterConfig"):
        config_from_dict({"type": "test-toy"}, OuterConfig)
    with pytest.raises(OptlabError, match="needs a 'type'"):
        config_from_dict({"sparsity": 0.5})
    with pytest.raises(OptlabError, match="sparsity must be a finite number"):
        config_from_dict({"type": "test-toy", "sparsity": float("nan")})
    with pytest.raises(OptlabError, match="steps must be a whole number of at least 1"):
        OuterConfig(steps=0)


def test_configurable_needs_a_frozen_dataclass_and_immutable_defaults() -> None:
    with pytest.raises(TypeError, match="frozen dataclass"):
        configurable("test-bad")(dataclass(type("Bad", (), {"__annotations__": {}})))
    with pytest.raises(TypeError, match="immutable"):
        option([1, 2], "a list")


def test_methods_dispatch_on_type_and_suggest_names() -> None:
    registry = MethodRegistry()
    registry.register("toy", ToyConfig, "a toy", handler="H")
    assert registry.of(ToyConfig(), "toy").handler == "H"
    assert list(registry.methods("toy")) == ["test-toy"]
    with pytest.raises(OptlabError, match="Did you mean 'test-toy'"):
        registry.get("toy", "test-tyo")
    with pytest.raises(OptlabError, match="OuterConfig is not a toy config: use ToyConfig"):
        registry.of(OuterConfig(), "toy")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("toy", ToyConfig, "again")
    import optlab.pruning.pruner  # noqa: F401  (registers the pruning methods)

    assert "wanda" in METHODS.methods("prune")
    assert config_to_dict(Unregistered()) == {"x": 1}  # plain dataclasses carry no tag
