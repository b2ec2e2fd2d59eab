"""Every config key given wrong values, each checked as ``launch local --nproc 2`` checks a stage before
any process starts (tests/unit/test_config_wrong_values.py runs this in a child with a memory bound).

    python -m tests.wrong_values DIGITS_DIR RUN_DIR OUT.json

For each case it records whether the check refused it with a ConfigError naming the key ("named"),
refused it naming another key ("other key", with the message), accepted it ("accepted"), or raised
anything else ("crash", with the exception). Nothing may be written: RUN_DIR must not exist afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import signal
import sys
import typing

from launch.stage import split_stage
from pretrain.config import Config, ConfigError, objective_config_class
from pretrain.objectives import OBJECTIVES
from tests.conftest import REPO

RECIPES = {"supervised": "digits_supervised", "dino": "dino_demo", "dinov2": "dinov2_demo", "moby": "demo",
           "simmim": "simmim_demo"}
TYPE_WRONG = {int: "'not-a-number'", float: "'not-a-number'", bool: "'maybe'", str: "{a: 1}", dict: "[1, 2]",
              list: "{a: 1}", tuple: "{a: 1}"}
OUT_OF_RANGE = ("-1000000000000", "1000000000000", ".nan")
# Values inside a mapping key (model.kwargs), which the type alone cannot refuse: sizes that would
# make the checks themselves build a model too large to hold, or take timm's own errors.
KWARGS = ["{depth: 1000000}", "{depths: [1000000, 1]}", "{embed_dim: 30, num_heads: 4}", "{depth: -1}",
          "{mlp_ratio: .nan}", "{no_such_argument: 1}", "{depth: 'x'}"]


def fields(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, type hint) of every leaf key of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hints[f.name]))
    return out


def kinds(hint) -> set[type]:
    """The plain types a hint admits (``int | None`` -> {int}; a Literal -> the type of its values)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {type(a) for a in args}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return set().union(*(kinds(a) for a in args if a is not type(None)))
    return {origin or hint}


def wrong_values(hint) -> list[str]:
    admitted = kinds(hint)
    values = []
    if typing.get_origin(hint) is typing.Literal:
        values.append("'no-such-choice'")
    if not admitted & {str, dict}:
        values.append(TYPE_WRONG[str])  # a mapping where no mapping is taken
    if admitted <= {str} or admitted == {bool}:
        values.append("[1, 2]")
    if admitted & {int, float} and bool not in admitted:
        values += OUT_OF_RANGE
    return values


def cases() -> list[tuple[str, str, str]]:
    """(objective, key, value)."""
    out = []
    for key, hint in fields(Config):
        if key in ("objective.name",):
            continue
        for value in wrong_values(hint):
            out.append(("supervised", key, value))
    out += [("supervised", "model.kwargs", value) for value in KWARGS]
    for name in OBJECTIVES:
        for key, hint in fields(objective_config_class(name)):
            if key != "name":
                out += [(name, f"objective.{key}", value) for value in wrong_values(hint)]
    return out


CASE_SECONDS = 20  # a check that takes longer is as bad as one that fails
MEMORY_BOUND = 6 * 2**30  # bytes of data memory the whole check may use (torch and timm loaded: about 1 GB)


def too_slow(signum, frame):
    raise TimeoutError(f"the check took over {CASE_SECONDS} s")


def main() -> None:
    digits, run_dir, out = sys.argv[1:]
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_BOUND, MEMORY_BOUND))
    signal.signal(signal.SIGALRM, too_slow)
    results = []
    for objective, key, value in cases():
        recipe = str(REPO / "configs/pretrain" / f"{RECIPES[objective]}.yaml")
        argv = [recipe, f"run.dir={run_dir}", f"data.train={digits}", f"data.val={digits}", "data.prepare=none",
                f"{key}={value}"]
        signal.alarm(CASE_SECONDS)
        try:
            split_stage(argv).check(2)
            outcome, detail = "accepted", ""
        except ConfigError as e:
            named = str(e).startswith(key) or f"{key}=" in str(e) or f"{key}." in str(e)
            outcome, detail = ("named" if named else "other key"), str(e)
        except Exception as e:  # noqa: BLE001 (what the test looks for)
            outcome, detail = "crash", f"{type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
        results.append({"objective": objective, "key": key, "value": value, "outcome": outcome,
                        "detail": detail[:300]})
        print(objective, key, value, outcome, flush=True)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
