"""Every recipe matches its table in docs/recipes.md: the resolved value of each documented key, and
either the paper's / official value or a written reason for the difference."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from finetune.config import ROOTS
from pretrain.config import Config, load_config, read_recipe
from tests.conftest import REPO

DOC = REPO / "docs/recipes.md"
# Keys that say where and how a run is executed, not what it learns.
NOT_HYPERPARAMETERS = ("run.", "data.train", "data.val", "data.workers", "data.shuffle_buffer", "data.prepare",
                       "train.ckpt_every", "train.eval_every", "train.keep_last", "train.log_every",
                       "engine.zero_stage", "engine.deepspeed", "model.grad_checkpointing", "features.cache",
                       "features.dtype", "knn.chunk", "objective.export", "objective.name")


def _value(cell: str):
    """The first `backticked` YAML value of a table cell, or None when the cell has none."""
    found = re.match(r"\s*`([^`]*)`", cell)
    return yaml.safe_load(found.group(1)) if found else None


def parse(text: str) -> tuple[dict[str, dict], list[str]]:
    """{recipe path: {"base": path or None, "rows": {key: (recipe, official, difference)}}}, and the
    recipes listed as having no published source."""
    sections, exempt, current = {}, [], None
    for line in text.splitlines():
        heading = re.match(r"## `(configs/[^`]+\.yaml)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), {"base": None, "rows": {}})
            continue
        if line.startswith("## "):
            current = "exempt" if "without a published source" in line else None
            continue
        if current == "exempt":
            exempt += re.findall(r"`(configs/[^`]+\.yaml)`", line)
        elif current is not None and line.startswith("Extends: "):
            current["base"] = re.search(r"`(configs/[^`]+\.yaml)`", line).group(1)
        elif current is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            assert len(cells) == 5, f"docs/recipes.md: a row needs 5 cells: {line}"
            key = cells[0].strip("`")
            current["rows"][key] = (_value(cells[1]), cells[2], cells[4])
    return sections, exempt


def resolved(path: str) -> dict:
    raw = read_recipe(REPO / path)
    if path.startswith("configs/finetune/"):
        root = ROOTS["knn"] if "knn" in raw else ROOTS["linear"] if "linear" in raw else ROOTS["full"]
        overrides = [] if root is ROOTS["full"] else ["pretrained=weights.pth"]
        return load_config(REPO / path, overrides, root).to_dict()
    return load_config(REPO / path, [], Config).to_dict()


def lookup(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"{key}: not a key of the resolved recipe"
        node = node[part]
    return node


def _plain(value):
    """Numbers (and YAML 1.1's numeric strings such as "5e-4") as floats, tuples as lists."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def same(a, b) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def leaves(raw: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in raw.items():
        if isinstance(value, dict) and key != "kwargs":
            out += leaves(value, f"{prefix}{key}.")
        elif key == "kwargs":
            out += [f"{prefix}kwargs.{k}" for k in value]
        else:
            out.append(prefix + key)
    return out


SECTIONS, EXEMPT = parse(DOC.read_text())
RECIPES = sorted(str(p.relative_to(REPO)) for d in ("configs/pretrain", "configs/finetune")
                 for p in (REPO / d).glob("*.yaml"))


def test_every_recipe_has_a_table_or_is_listed_without_a_source():
    for path in RECIPES:
        assert path in SECTIONS or path in EXEMPT, f"{path}: no table in docs/recipes.md"
    for path in [*SECTIONS, *EXEMPT]:
        assert path in RECIPES, f"docs/recipes.md names {path}, which does not exist"


def rows_with_bases(path: str) -> dict:
    section = SECTIONS[path]
    inherited = rows_with_bases(section["base"]) if section["base"] else {}
    return {**inherited, **section["rows"]}


def problems(path: str, values: dict) -> list[str]:
    """What in the resolved recipe ``values`` disagrees with the tables of ``path``."""
    out = []
    rows = rows_with_bases(path)
    if not rows:
        out.append(f"{path}: empty table")
    for key, (recipe, official_cell, difference) in rows.items():
        actual = lookup(values, key)
        if not same(actual, recipe):
            out.append(f"{path}: {key} is {actual!r}, docs/recipes.md says {recipe!r}")
        if not difference and not same(_value(official_cell), recipe):
            out.append(f"{path}: {key}: recipe {recipe!r}, official {official_cell!r}, and no reason given")
    for key in leaves(read_recipe(REPO / path)):
        if not key.startswith(NOT_HYPERPARAMETERS) and key not in rows:
            out.append(f"{path}: {key} is set by the recipe but missing from docs/recipes.md")
    return out


@pytest.mark.parametrize("path", sorted(SECTIONS))
def test_recipe_matches_its_table(path):
    assert problems(path, resolved(path)) == []


def test_a_drifting_recipe_fails():
    """The check can fail: a recipe whose min lr moved no longer matches its row."""
    values = resolved("configs/pretrain/dino_vit_small.yaml")
    values["optim"]["min_lr"] *= 10
    assert any("optim.min_lr" in p for p in problems("configs/pretrain/dino_vit_small.yaml", values))
