"""Typed run configuration: dataclass defaults, YAML recipes as diffs, ``key=value`` overrides.

A recipe is a YAML mapping of sections (``run``, ``model``, ``data``, ``objective``, ``optim``,
``train``, ``engine``). It may name a ``base`` recipe (a path relative to itself) that it amends.
Everything is checked before any work starts: an unknown key, a wrong type or a value out of range
raises :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pretrain import recipe_path
from pretrain.sections import (IMAGENET_MEAN, IMAGENET_STD, MAX_BLOCKS, MAX_IMAGE_SIZE, Config, ConfigError,
                               DataConfig, EngineConfig, ModelConfig, ObjectiveConfig, OptimConfig, RunConfig,
                               TrainConfig, merge, require)

# The vocabulary lives below this module (pretrain.sections), where the objectives import it without
# importing the objective table back; re-exported here for whatever loads configs.
__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAX_BLOCKS", "MAX_IMAGE_SIZE", "Config", "ConfigError", "DataConfig",
           "DuplicateKeyError", "EngineConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "RunConfig",
           "TrainConfig", "apply_overrides", "build", "dump_config", "for_world_size", "load_config", "load_yaml",
           "merge", "objective_config_class", "read_recipe", "require", "save_config"]


class _NotFinite(ConfigError):
    """A number that is nan or infinite: said as such, not as a type mismatch of a union."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __str__(self) -> str:
        return f"line {self.problem_mark.line + 1}: {self.problem} (YAML would keep the last one silently)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the safe loader says what is wrong with it
                    continue
                if duplicate:
                    raise DuplicateKeyError("while reading a mapping", node.start_mark,
                                            f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """YAML as the safe loader reads it, with duplicate keys refused (DuplicateKeyError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def for_world_size(cfg: Config, world_size: int) -> Config:
    """``cfg`` for ``world_size`` processes: a ``data.global_batch`` becomes the per-process batch size.

    The same recipe then trains with the same global batch on any number of GPUs."""
    if cfg.data.global_batch is None:
        return cfg
    per_step = world_size * cfg.train.grad_accum
    require(cfg.data.global_batch % per_step == 0, "data.global_batch", cfg.data.global_batch,
            f"not divisible by the world size {world_size} x train.grad_accum {cfg.train.grad_accum}")
    data = dataclasses.replace(cfg.data, batch_size=cfg.data.global_batch // per_step)
    resolved = dataclasses.replace(cfg, data=data)
    resolved.validate()  # checks that involve the batch size (e.g. an even batch for mixup)
    return resolved


# ---------------------------------------------------------------------------------------------
# Loading


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a plain dict, with its ``base`` chain merged underneath it. A missing
    ``configs/...`` path names a recipe shipped with vitscale."""
    path = recipe_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          f"save the recipe as UTF-8") from None
    try:
        raw = load_yaml(text) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path, got {base!r}")
    return merge(read_recipe(path.parent / base, _seen + (path,)), raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (``null``, ``[1, 2]``, ``3e-4``)."""
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = load_yaml(text) if text else ""
        except DuplicateKeyError as e:
            raise ConfigError(f"override {item!r}: {e.problem}") from None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None:
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
                child = {}
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = (), root: type = Config) -> Config:
    """Read, merge and check a recipe; raises ConfigError naming the first bad key.

    ``root`` is the top-level dataclass (``Config``, or a later stage's subclass or sibling of it).
    """
    raw = read_recipe(path) if path else {}
    raw = apply_overrides(raw, list(overrides))
    cfg = build(raw, root)
    cfg.validate()
    return cfg


def build(raw: dict, root: type = Config) -> Any:
    """``root`` from a plain dict: dataclass-typed fields are sections, the others plain values."""
    fields = dataclasses.fields(root)
    unknown = set(raw) - {f.name for f in fields}
    if unknown:
        _unknown(sorted(unknown)[0], "", [f.name for f in fields])
    hints = typing.get_type_hints(root)
    values = {}
    for section in fields:
        if not dataclasses.is_dataclass(hints[section.name]):
            if section.name in raw:
                values[section.name] = _check(raw[section.name], hints[section.name], section.name)
            continue
        data = raw.get(section.name, {}) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{section.name}: must be a mapping, got {data!r}")
        cls = objective_config_class(data.get("name", "supervised")) if section.name == "objective" else \
            section.default_factory
        values[section.name] = _from_dict(cls, data, section.name + ".")
    return root(**values)


def objective_config_class(name: Any) -> type:
    from pretrain.objectives import OBJECTIVES

    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ConfigError(f"objective.name={name!r}: unknown objective; choose one of {sorted(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name]).Config


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            _unknown(key, prefix, names)
        kwargs[key] = _check(value, hints[key], prefix + key)
    return cls(**kwargs)


def _unknown(key: str, prefix: str, names: list[str]) -> None:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
    raise ConfigError(f"unknown config key {prefix}{key}{hint}")


def _check(value: Any, hint: Any, key: str) -> Any:
    """``value`` converted to ``hint`` (int -> float, list -> tuple), or ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _check(value, option, key)
            except _NotFinite:
                raise
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_describe(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(repr, args))}")
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise _NotFinite(f"{key}={value!r}: must be finite (not nan or infinite)")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    else:
        raise TypeError(f"unsupported config type {hint!r} for {key}")
    raise ConfigError(f"{key}={value!r}: expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if origin in (list, tuple):
        return f"a {origin.__name__} of " + ", ".join(_describe(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
