"""Hypothesis strategies and the fuzz oracle shared by tests/fuzz: structured mutations of real
inputs (configs, headers, requests), and "a mopt error with a message, or a correct result"."""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Callable, Iterator

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mopt.errors import MoptError
from time_limit import time_limit


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible in CI: fixed examples (derandomize), no deadline, no example database on disk.
    ``MOPT_FUZZ_SCALE=N`` runs N times as many examples (a longer local hunt)."""
    scale = int(os.environ.get("MOPT_FUZZ_SCALE", "1"))
    return settings(max_examples=max_examples * scale, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# A 5000-digit integer cannot be written by json.dumps (Python's digit limit), so it is spliced
# into the text by write_json.
HUGE_INT = "<5000-digit integer>"

INTERESTING = [None, True, False, 0, 1, -1, -32, 2, 16, 16.5, 1e-45, 2**64, -(2**63), float("nan"), float("inf"),
               float("-inf"), "", "16", "FP8", "NVFP4", "gelu", "silu", [], {}, [1, 2], ["lm_head"], [None], {"a": 1},
               HUGE_INT]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)), max_leaves=6)


def near(value: Any) -> st.SearchStrategy:
    """Values close to a real one: the kind of edit a sloppy tool or a person makes."""
    if isinstance(value, bool):
        return st.sampled_from([not value, int(value), str(value).lower()])
    if isinstance(value, int):
        return st.sampled_from([value + 1, value - 1, value * 2, -value, 0, float(value), value + 0.5, str(value)])
    if isinstance(value, float):
        return st.sampled_from([value * 2, -value, 0.0, math.nan, math.inf, str(value)])
    if isinstance(value, str):
        return st.sampled_from([value.upper(), value.lower(), value + "x", "", value[:-1]])
    if isinstance(value, list):
        return st.sampled_from([value[:-1], value + value[-1:], [1, 2], [value]]) if value else st.just([0])
    return st.just(value)


def values_for(original: Any) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(INTERESTING), json_values, near(original))


def _dicts(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    if isinstance(node, dict):
        yield path, node
        for key, child in node.items():
            yield from _dicts(child, path + (key,))


@st.composite
def mutated(draw, base: dict, extra_keys: list[str] = (), max_edits: int = 3) -> dict:
    """``base`` with 1..max_edits edits, each on the top level or a nested object: set a key (an
    existing one, a known one or a random one) to a nearby, interesting or random value, or delete it."""
    config = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_edits))):
        targets = list(_dicts(config))
        _, target = draw(st.sampled_from(targets))
        known = sorted(set(target) | set(extra_keys))
        key = draw(st.sampled_from(known) | st.text(max_size=6)) if known else draw(st.text(max_size=6))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            # A copy: sampled values are shared between examples and later edits mutate in place.
            target[key] = copy.deepcopy(draw(values_for(target.get(key))))
    return config


def dumps(value: Any) -> str:
    import json

    text = json.dumps(value)
    return text.replace(json.dumps(HUGE_INT), "1" * 5000)


def outcome(call: Callable[[], Any], seconds: int = 30) -> Any:
    """The oracle: ``call()``'s result, or the ``MoptError`` it raised (which must say something).
    Any other exception propagates and fails the example."""
    with time_limit(seconds, "fuzz example still running"):
        try:
            return call()
        except MoptError as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            return e
