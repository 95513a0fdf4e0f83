"""Head specs and input keys: one parse, round trips, clear refusals (runtime/gates/specs.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.heads import input_key, input_sources
from bouncer.runtime.gates.specs import HeadSpec, InputKey

NAME = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)


@st.composite
def specs(draw) -> str:
    kind = draw(st.sampled_from(["maha", "patch", "knn", "patchknn", "orphan"]))
    if kind == "patchknn":
        return "patchknn:" + "+".join(draw(st.lists(NAME, min_size=1, max_size=3)))
    reduce = draw(st.sampled_from(["", "@max", "@tiles"])) if kind == "knn" else ""
    return f"{kind}:{draw(NAME)}{reduce}"


@given(specs())
def test_a_spec_round_trips_and_names_its_input(spec):
    h = HeadSpec.parse(spec)
    assert str(h) == spec and HeadSpec.parse(str(h)) == h
    key = InputKey.parse(input_key(spec))
    assert key == h.input and list(key.sources) == input_sources(str(key))
    assert (key.reduce == "patch") == (h.kind == "patchknn")


def test_the_input_keys_of_known_heads():
    assert input_key("knn:map_s16@max") == "map_s16@max"
    assert input_key("patchknn:map_s8+map_s16") == "map_s8+map_s16@patch"
    assert InputKey.parse("map_s8+map_s16@patch").sources == ("map_s8", "map_s16")
    assert InputKey.parse("features").reduce is None


@pytest.mark.parametrize("bad", ["", "knn", "knn:", "maha:x@max", "knn:x@mean", "maha:a+b", "patchknn:a+", "zz:x"])
def test_a_bad_spec_is_refused_by_name(bad):
    with pytest.raises(BouncerError, match="OOD head"):
        HeadSpec.parse(bad)


@pytest.mark.parametrize("bad", ["", "@max", "x@mean", "a++b@patch"])
def test_a_bad_input_key_is_refused_by_name(bad):
    with pytest.raises(BouncerError, match="OOD input"):
        InputKey.parse(bad)
