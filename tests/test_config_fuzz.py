"""Property-based fuzzing of job configs: every broken config gets a ConfigError whose
message starts with the dotted key at fault, never another exception."""

import dataclasses
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import ConfigError, flatten, job_class, load_config

BASES = {name: yaml.safe_load(open(f"configs/{name}.yaml")) for name in ("v2pe-demo", "piip-demo", "v2pe-256k")}


def _schema(cls, prefix="") -> dict:
    """Every dotted key of a job class's schema (sections and leaves) -> its type."""
    out = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = out[path] = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out |= _schema(tp, path + ".")
    return out


TYPES = _schema(job_class("v2pe")) | _schema(job_class("piip"))
SCHEMA = set(TYPES)
SECTIONS = sorted(p for p, tp in TYPES.items() if dataclasses.is_dataclass(tp))
LEAVES = sorted(p for p in SCHEMA if p not in SECTIONS)


def _type_fits(tp, value) -> bool:
    """Whether `value` has the declared type (bounds aside): a value that does not
    must be rejected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if args and type(None) in args:
        return value is None or any(_type_fits(a, value) for a in args if a is not type(None))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list or tp is list:
        return isinstance(value, list) and all(_type_fits(args[0], v) for v in value) if args else isinstance(value, list)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True

junk = st.one_of(
    st.text(max_size=12), st.booleans(), st.none(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 5), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def broken(draw):
    """(config dict, the key it breaks, whether it must be rejected)."""
    base = draw(st.sampled_from(sorted(BASES)))
    data = yaml.safe_load(yaml.safe_dump(BASES[base]))  # deep copy
    kind = draw(st.sampled_from(["wrong_value", "unknown_key", "negative", "layout"]))
    if kind == "wrong_value":
        key, value = draw(st.sampled_from(LEAVES)), draw(junk)
        # A value of the wrong type must be rejected; one of the right type may be fine.
        must = not _type_fits(TYPES[key], value) and not (key == "workload" and value in ("v2pe", "piip"))
    elif kind == "unknown_key":
        section = draw(st.sampled_from(["", *SECTIONS]))
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))
        key = f"{section}.{name}" if section else name
        if key in SCHEMA:
            key += "_x"
        value, must = draw(junk), True
    elif kind == "negative":
        numeric = [k for k, v in flatten(data).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        key = draw(st.sampled_from(sorted(numeric)))
        value, must = draw(st.one_of(st.integers(-(10**6), -1), st.floats(max_value=-1e-9, allow_infinity=True))), True
        if key in ("training.weight_decay",):  # signed settings are none; all sizes/rates are >= 0
            pass
    else:
        key = draw(st.sampled_from(["resources.workers", "parallelism.cp", "parallelism.cp_a2a",
                                    "piip.ranks_per_branch", "piip.resolutions"]))
        if key.startswith("piip."):
            value = draw(st.lists(st.integers(-2, 70), max_size=5))
        else:
            value = draw(st.integers(-3, 70))
        must = False
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return data, key, must


def _valid_number(v):
    return not isinstance(v, float) or math.isfinite(v)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken())
def test_broken_configs_name_their_key(case):
    data, key, must = case
    try:
        cfg = load_config(yaml.safe_dump(data))
    except ConfigError as e:
        msg = str(e)
        named = msg.split(":", 1)[0]
        assert named in SCHEMA or named == key, f"error does not start with a config key: {msg!r}"
        return
    # Accepted: only when the change was harmless, and never with a non-finite number.
    assert not must, f"{key}={data!r} was accepted"
    for k, v in flatten(dataclasses.asdict(cfg)).items():
        assert _valid_number(v), f"{k}={v!r} accepted"


@pytest.mark.parametrize("key,value,message", [
    ("training.lr", float("nan"), r"training.lr: must be a finite number, got nan"),
    ("parallelism.timeout_s", float("inf"), r"parallelism.timeout_s: must be a finite number, got inf"),
    ("resources.workers", 10**9, r"resources.workers: must be <= 100000, got 1000000000"),
    ("piip.resolutions", ["big", 32, 16], r"piip.resolutions: 'big' is not a positive integer"),
])
def test_what_the_fuzzer_found(key, value, message):
    base = "piip-demo" if key.startswith("piip") else "v2pe-demo"
    with pytest.raises(ConfigError, match=message):
        load_config(f"configs/{base}.yaml", overrides={key: value})
