"""Strict dataclass loading: unknown keys, wrong types and overrides name the key and the file."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from imagebert_ds.config_utils import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class Inner:
    lr: float = 1e-4
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    maybe: Optional[int] = None

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")


def test_round_trip_and_types():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"lr": 1, "kind": "b"}, "tags": ["t"]})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data,needle", [
    ({"stepz": 3}, "unknown key 'stepz'"),
    ({"inner": {"lrr": 1}}, "unknown key 'inner.lrr'"),
    ({"steps": "3"}, "'steps' must be an integer"),
    ({"steps": True}, "'steps' must be an integer"),
    ({"inner": {"kind": "c"}}, "'inner.kind' must be one of"),
    ({"steps": 0}, "steps must be > 0"),
])
def test_errors_name_key_and_file(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data, source="cfg.yaml")
    assert "cfg.yaml" in str(e.value) and needle in str(e.value)


def test_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 2\ninner:\n  lr: 0.5\n")
    data = apply_overrides(load_yaml(p), ["inner.lr=1e-3", "tags=[a, b]", "maybe=null"])
    cfg = from_dict(Outer, data, source=str(p))
    assert cfg.inner.lr == 1e-3 and cfg.tags == ["a", "b"] and cfg.maybe is None
    with pytest.raises(ConfigError, match="unknown key 'inner.typo'"):
        from_dict(Outer, apply_overrides(load_yaml(p), ["inner.typo=1"]), source=str(p))
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])
