from dataclasses import dataclass

import pytest

from optlab.core.config import Registry, config_from_dict, config_to_dict
from optlab.errors import OptlabError


@dataclass(frozen=True)
class ToyConfig:
    sparsity: float = 0.5
    pattern: str = "unstructured"
    layers: tuple[int, ...] = (0, 1)


def test_registry_finds_names_and_suggests_close_ones() -> None:
    methods: Registry[str] = Registry("method")
    methods.register("wanda")("W")
    methods.register("sparsegpt")("S")
    assert methods.get("wanda") == "W" and list(methods) == ["sparsegpt", "wanda"]
    with pytest.raises(OptlabError, match=r"unknown method 'wandaa'\. Did you mean 'wanda'"):
        methods.get("wandaa")
    with pytest.raises(ValueError, match="registered twice"):
        methods.register("wanda")("again")


def test_config_round_trip_and_unknown_fields() -> None:
    config = ToyConfig(sparsity=0.6, layers=(3,))
    data = config_to_dict(config)
    assert data == {"sparsity": 0.6, "pattern": "unstructured", "layers": [3]}
    assert config_from_dict(ToyConfig, {**data, "layers": (3,)}) == config
    with pytest.raises(OptlabError, match="Did you mean 'sparsity'"):
        config_from_dict(ToyConfig, {"sparsit": 0.5})
