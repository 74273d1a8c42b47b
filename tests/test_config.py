from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from cosy import config
from cosy.errors import CosyError


@dataclass
class Inner:
    dim: int = 4
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[int, int] = (3, 4)
    maybe: Optional[Inner] = None
    flag: bool = False


def test_round_trip_through_yaml(tmp_path):
    obj = Outer(name="y", inner=Inner(dim=8, rate=0.5, kind="b"), sizes=[5], maybe=Inner(dim=2), flag=True)
    path = tmp_path / "c.yaml"
    path.write_text(config.dumps(obj))
    assert config.load(Outer, path) == obj


def test_unknown_key_is_named_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  dimm: 3\n")
    with pytest.raises(CosyError, match=r"'inner\.dimm'") as err:
        config.load(Outer, path)
    assert str(path) in str(err.value)


def test_type_errors_name_the_key():
    with pytest.raises(CosyError, match=r"'inner\.dim' must be an integer"):
        config.from_dict(Outer, {"inner": {"dim": "four"}})
    with pytest.raises(CosyError, match=r"'inner\.kind' must be one of"):
        config.from_dict(Outer, {"inner": {"kind": "c"}})
    with pytest.raises(CosyError, match=r"'pair' must have 2 items"):
        config.from_dict(Outer, {"pair": [1, 2, 3]})
    with pytest.raises(CosyError, match=r"'flag' must be true or false"):
        config.from_dict(Outer, {"flag": 1})


def test_ints_and_exponents_without_a_dot_are_accepted_for_floats(tmp_path):
    assert config.from_dict(Inner, {"rate": 1}).rate == 1.0
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  rate: 1e-4\n")  # a string to YAML 1.1, which wants 1.0e-4
    assert config.load(Outer, path).inner.rate == 1e-4
    assert config.load(Outer, path, ["inner.rate=2e-3"]).inner.rate == 2e-3
    with pytest.raises(CosyError, match=r"'inner\.rate' must be a number, got 'fast'"):
        config.from_dict(Outer, {"inner": {"rate": "fast"}})


def test_overrides_are_parsed_as_yaml_and_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: z\n")
    obj = config.load(Outer, path, ["inner.dim=16", "sizes=[7, 8]", "maybe.rate=0.25"])
    assert obj.inner.dim == 16 and obj.sizes == [7, 8] and obj.maybe.rate == 0.25
    with pytest.raises(CosyError, match="'inner.nope'"):
        config.load(Outer, path, ["inner.nope=1"])
    with pytest.raises(CosyError, match="section.key=value"):
        config.load(Outer, path, ["inner.dim"])
    path.write_text("name: z\ninner:\n")  # a section left empty takes overrides like an absent one
    assert config.load(Outer, path, ["inner.dim=5"]).inner.dim == 5
    with pytest.raises(CosyError, match="'name' is not a section"):
        config.load(Outer, path, ["name.x=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(CosyError, match="not found"):
        config.load(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(CosyError, match="not valid YAML"):
        config.load(Outer, bad)
