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


# Values each objective's source fixes, in code or config, that a recipe citing it must list in its
# table whether it writes them or inherits them (the defaults of pretrain/sections.py may differ).
SOURCE_FIXED = {
    "dino": ["objective.norm_last_layer", "objective.interpolation", "model.pos_embed_interpolation",
             "optim.lr_scaling", "optim.scale_min_lr"],
    "dinov2": ["objective.norm_last_layer", "model.pos_embed_interpolation", "objective.mask_token_init",
               "objective.freeze_last_layer_by", "objective.per_gpu_batch", "optim.lr_scaling",
               "optim.scale_min_lr"],
    "moby": ["objective.interpolation", "optim.lr_scaling", "optim.scale_min_lr"],
    "simmim": ["objective.interpolation", "objective.mask_token_init", "optim.lr_scaling", "optim.scale_min_lr"],
    "simmim_ft": ["objective.interpolation", "optim.lr_scaling", "optim.scale_min_lr", "optim.lr_floor",
                  "finetune.layer_decay"],
}
SIMMIM_VIT = ["model.kwargs.fix_init"]
SIMMIM_VIT_FT = ["finetune.head_init_scale"]
SIMMIM_SWIN_FT = ["finetune.relpos_interpolation"]


def source_fixed_keys(path: str) -> list[str]:
    values = resolved(path)
    name = values.get("objective", {}).get("name")
    if path.startswith("configs/finetune/simmim_"):
        vit = values["model"]["name"].startswith("vit_")
        return SOURCE_FIXED["simmim_ft"] + (SIMMIM_VIT_FT if vit else SIMMIM_SWIN_FT)
    keys = list(SOURCE_FIXED.get(name, []))
    if name == "simmim" and values["model"]["name"].startswith("vit_"):
        keys += SIMMIM_VIT
    return keys


def unlisted_source_values(path: str, rows: dict) -> list[str]:
    return [key for key in source_fixed_keys(path) if key not in rows]


@pytest.mark.parametrize("path", sorted(SECTIONS))
def test_values_the_source_fixes_are_listed(path):
    assert unlisted_source_values(path, rows_with_bases(path)) == []


def test_an_unlisted_source_value_fails():
    """The check can fail: DINOv2's table without its norm_last_layer row (the recipe inherits
    DINO's default true, which DINOv2's head does not have)."""
    path = "configs/pretrain/dinov2_vit_l16_in1k.yaml"
    rows = {k: v for k, v in rows_with_bases(path).items() if k != "objective.norm_last_layer"}
    assert unlisted_source_values(path, rows) == ["objective.norm_last_layer"]


def plan_at(path: str, global_batch: int, processes: int):
    """The recipe's plan (lr, min lr) and per-process config with another global batch and world size."""
    from pretrain.config import for_world_size
    from pretrain.data.shards import ShardSet
    from pretrain.plan import make_plan

    cfg = load_config(REPO / path, [f"data.global_batch={global_batch}", "data.train_samples=1281167",
                                    "data.num_classes=1000"], Config)
    cfg = for_world_size(cfg, processes)
    return cfg, make_plan(cfg, processes, ShardSet(["x.tar"], samples=1281167))


# (recipe, recipe's global batch, official lr rule, whether the official min lr scales with it)
SCALING = [("configs/pretrain/dino_vit_small.yaml", 1024, lambda r: r, False),
           ("configs/pretrain/dinov2_vit_l16_in1k.yaml", 2048, math.sqrt, False),
           ("configs/pretrain/moby_swin_tiny.yaml", 512, lambda r: r, True),
           ("configs/pretrain/simmim_vit_base.yaml", 2048, lambda r: r, True)]


@pytest.mark.parametrize("path, batch, rule, min_lr_scales", SCALING, ids=[s[0].split("/")[-1] for s in SCALING])
def test_lr_and_min_lr_follow_the_global_batch_as_the_official_code(path, batch, rule, min_lr_scales):
    _, at_recipe = plan_at(path, batch, 8)
    cfg, doubled = plan_at(path, 2 * batch, 16)
    assert doubled.peak_lr == pytest.approx(at_recipe.peak_lr * rule(2.0))
    assert doubled.min_lr == pytest.approx(at_recipe.min_lr * (2.0 if min_lr_scales else 1.0))
    assert cfg.data.batch_size == 2 * batch // 16


def test_dinov2_keeps_its_per_gpu_quantities_on_other_world_sizes():
    """DINOv2 ViT-L/16: 64 images per GPU on 32 GPUs. On 16 processes each rank takes KoLeo and the
    masks in two groups of 64; the teacher-temperature and freeze schedules stay in steps whatever the
    batch; on 64 processes (32 a rank) the recipe refuses, naming the key."""
    from pretrain.config import ConfigError

    path = "configs/pretrain/dinov2_vit_l16_in1k.yaml"
    cfg, plan = plan_at(path, 2048, 16)
    assert cfg.data.batch_size == 128 and cfg.objective.per_gpu_batch == 64
    assert plan.peak_lr == pytest.approx(4e-3 * math.sqrt(2))
    _, half = plan_at(path, 1024, 16)
    assert half.peak_lr == pytest.approx(4e-3)
    assert half.steps_per_epoch != plan.steps_per_epoch and half.warmup_steps == plan.warmup_steps == 12500
    assert (cfg.objective.teacher_temp_warmup_steps, cfg.objective.freeze_last_layer_steps) == (37500, 1250)
    with pytest.raises(ConfigError, match="objective.per_gpu_batch"):
        plan_at(path, 2048, 64)
