"""Pre-trained weights from wherever they come: read, recognize the layout, fit to a model.

Sources (``pretrained=PATH``):
- a vitscale export (``RUN_DIR/export`` or ``RUN_DIR``: ``backbone.safetensors`` + ``backbone.json``);
- a vitscale pre-training run dir without an export (``RUN_DIR``, ``RUN_DIR/checkpoints`` or one
  ``step_*`` tag in it): the network its export would hold (DINO's teacher, MoBY's online encoder or
  its target, see pretrain.run_backbone), from the checkpoint, built from the run's config;
- another DeepSpeed checkpoint directory (a fine-tuning run's, a foreign one): consolidated from the
  ZeRO shards;
- a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file read with ``torch.load(weights_only=True)``.

Layouts are recognized by their keys: timm state dicts, DINO (``teacher``/``student`` entries,
``backbone.`` and ``module.`` prefixes), MoBY (``encoder.``; the momentum ``encoder_k.`` is ignored),
official Swin (a ``model`` entry, relative-position buffers, old down-sampling names, 22K heads), and
vitscale objectives (the backbone under ``model.`` or another prefix).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from pretrain import export
from pretrain.config import ModelConfig
from pretrain.errors import UserError

log = logging.getLogger(__name__)

# Entries of a checkpoint file that hold the weights, in the order they are preferred. DINO keeps
# "teacher" and "student"; its evaluations use the teacher.
CONTAINER_KEYS = ("model", "state_dict", "teacher", "model_ema", "module", "student")
# Prefixes to strip, in the order they win a tie (MoBY's online "encoder." before "encoder_k.").
KNOWN_PREFIXES = ("", "module.", "backbone.", "module.backbone.", "teacher.backbone.", "teacher.",
                  "encoder.", "module.encoder.", "model.", "model.backbone.", "backbone.model.", "student.backbone.")


class WeightsError(UserError, ValueError):
    """Weights that cannot be read or do not fit the model; the message names the file and keys."""


@dataclass
class Pretrained:
    state_dict: dict[str, torch.Tensor]
    source: str
    layout: str  # how the weights were found, e.g. "teacher / prefix 'backbone.'"
    model_name: str | None = None  # when the source says which timm model it is
    model_kwargs: dict | None = None


# ---------------------------------------------------------------------------------------------
# Describing and reading a source


def describe(path: str | Path) -> tuple[str, dict] | None:
    """(timm model name, kwargs) when ``path`` is a vitscale export, run dir or checkpoint; else None."""
    path = Path(path).expanduser()
    export_dir = export.find_export(path)
    if export_dir is not None:
        meta = export.read_meta(export_dir)
        return meta["model"], dict(meta.get("kwargs", {}))
    run_dir = _run_dir_of(path) if path.is_dir() else None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        model = cfg.get("model", {})
        if "name" in model:
            kwargs = {"img_size": cfg.get("data", {}).get("image_size"),
                      "drop_path_rate": model.get("drop_path", 0.0), **model.get("kwargs", {})}
            return model["name"], {k: v for k, v in kwargs.items() if v is not None}
    return None


def _run_dir_of(path: Path) -> Path | None:
    """The run dir that holds ``path`` (itself, its checkpoints dir, or one checkpoint tag)."""
    from pretrain.state.layout import CHECKPOINTS_DIR

    if (path / CHECKPOINTS_DIR).is_dir():
        return path
    for parent in (path.parent, path.parent.parent):
        if parent.name != CHECKPOINTS_DIR and (parent / CHECKPOINTS_DIR).is_dir():
            return parent
    return None


def read(path: str | Path, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """The flat tensor dict stored at ``path`` (before any prefix is stripped)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"pretrained={str(path)!r}: no such file or directory")
    if path.is_dir():
        export_dir = export.find_export(path, export.WEIGHTS_NAME)
        if export_dir is not None:
            return _read_safetensors(export_dir / export.WEIGHTS_NAME)
        from pretrain.state import reading

        location = reading.locate(path)
        if location is None:
            raise WeightsError(f"pretrained={str(path)!r}: a directory with neither an export "
                               f"(backbone.safetensors) nor a DeepSpeed checkpoint ({reading.CHECKPOINT_FILES})")
        from pretrain.run_backbone import is_pretraining_run

        run_dir = _run_dir_of(path)
        if run_dir is not None and is_pretraining_run(run_dir):
            return _exported_network(run_dir, location[1])
        return _consolidate(*location)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        # Never unpickle a user's file; DINO's full checkpoints hold their argparse arguments,
        # a plain attribute bag, which is allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"pretrained={str(path)!r}: cannot read it as a weights-only torch file: {e}") from None
    return _unwrap(raw, str(path), checkpoint_key)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return export.read_weights(path)
    except export.ExportError as e:
        raise WeightsError(str(e)) from None


def _exported_network(run_dir: Path, tag: str | None) -> dict[str, torch.Tensor]:
    """The network a pre-training run's export would hold (DINO's teacher, not its student), from
    its checkpoint ``tag`` (default: the latest), verified as a resume verifies it."""
    from pretrain.errors import CheckpointError
    from pretrain.run_backbone import checkpoint_backbone

    try:
        state, what = checkpoint_backbone(run_dir, tag)
    except CheckpointError as e:
        raise WeightsError(str(e)) from None
    log.info("%s has no export: reading the %s", run_dir, what)
    return state


def _consolidate(directory: Path, tag: str | None) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint, gathered from its ZeRO partitions, verified and
    read weights-only (:func:`pretrain.state.reading.consolidated`)."""
    from pretrain.errors import CheckpointError
    from pretrain.state.reading import consolidated

    try:
        return consolidated(directory, tag)
    except CheckpointError as e:
        raise WeightsError(str(e)) from None


def _unwrap(raw, source: str, checkpoint_key: str | None) -> dict[str, torch.Tensor]:
    """Descend into the entry that holds the weights (``model``, ``teacher``, ...), keep tensors."""
    trail = []
    while isinstance(raw, dict) and not all(torch.is_tensor(v) for v in raw.values()):
        if checkpoint_key is not None and checkpoint_key in raw and not trail:
            key = checkpoint_key
        else:
            key = next((k for k in CONTAINER_KEYS if isinstance(raw.get(k), dict)), None)
        if key is None:
            break
        trail.append(key)
        raw = raw[key]
    if checkpoint_key is not None and trail[:1] != [checkpoint_key]:
        raise WeightsError(f"{source}: no entry {checkpoint_key!r} (finetune.checkpoint_key)")
    if not isinstance(raw, dict):
        raise WeightsError(f"{source}: holds a {type(raw).__name__}, not a state dict")
    tensors = {k: v for k, v in raw.items() if torch.is_tensor(v)}
    if not tensors:
        raise WeightsError(f"{source}: no tensors found (entries: {sorted(map(str, raw))[:10]})")
    return tensors


def strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """The keys under the prefix whose stripped names best match ``model_keys``, and that prefix.

    Candidates are the known prefixes plus every leading one to three dotted components seen in
    the keys, so an objective's own nesting is found too; ties go to the known order.
    """
    candidates = list(KNOWN_PREFIXES)
    for key in state:
        parts = key.split(".")
        candidates += [".".join(parts[:i]) + "." for i in range(1, min(4, len(parts)))]
    best, best_score = "", -1
    for prefix in dict.fromkeys(candidates):
        score = sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in model_keys)
        if score > best_score:
            best, best_score = prefix, score
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}, best


def load(path: str | Path, model_keys: set[str], checkpoint_key: str | None = None) -> Pretrained:
    """Read ``path`` and keep the backbone's weights, named as ``model_keys`` names them."""
    raw = read(path, checkpoint_key)
    state, prefix = strip_prefix(raw, model_keys)
    described = describe(path)
    name, kwargs = described if described else (None, None)
    return Pretrained(state, str(path), f"prefix {prefix!r}" if prefix else "no prefix", name, kwargs)


# ---------------------------------------------------------------------------------------------
# Fitting to a model


def classifier_prefix(model: nn.Module) -> str:
    """``head.`` for a ViT, ``head.fc.`` for a Swin: where the model's classifier lives."""
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return name + "."
    raise WeightsError(f"{type(model).__name__}: its classifier is not one of its modules")


def read_class_map(path: str | Path) -> torch.Tensor:
    """One source-class index per target class, one per line (e.g. ImageNet-22K -> 1K)."""
    path = Path(path).expanduser()
    try:
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return torch.tensor([int(line) for line in lines if line], dtype=torch.long)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a class map (one integer source-class index per line): {e}") from None


def fit_to_model(pretrained: Pretrained, model: nn.Module, head: str = "new",
                 class_map: str | None = None, relpos_interpolation: str = "geometric") -> dict[str, torch.Tensor]:
    """The weights adapted to ``model`` (resolution, window, classifier); WeightsError naming every
    missing or unexpected key, or a shape that cannot be adapted.

    ``head``: ``new`` keeps the model's freshly initialized classifier, ``keep`` loads the stored one
    (same classes), ``map`` picks the stored classifier's rows named by ``class_map``.
    ``relpos_interpolation``: how Swin's relative-position tables follow a new window (finetune.resize).
    """
    from finetune.resize import adapt

    state = adapt(pretrained.state_dict, model, relpos_interpolation)
    head_prefix = classifier_prefix(model)
    stored_head = {k: v for k, v in state.items() if k.startswith(head_prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    expected = model.state_dict()
    if head == "keep":
        state.update(stored_head)
    elif head == "map":
        rows = read_class_map(class_map)
        for key, value in stored_head.items():
            if rows.max() >= len(value):
                raise WeightsError(f"{class_map}: index {int(rows.max())} is beyond the {len(value)} classes of "
                                   f"{pretrained.source}'s {key}")
            state[key] = value[rows]
    model_keys = set(expected) if head != "new" else {k for k in expected if not k.startswith(head_prefix)}
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{pretrained.source} ({pretrained.layout}) does not fit {type(model).__name__}: "
                           f"{_listing('missing', missing)}{_listing('unexpected', unexpected)}")
    wrong = [f"{k}: stored {tuple(v.shape)}, model {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise WeightsError(f"{pretrained.source}: shapes that do not fit the model: " + "; ".join(wrong[:10]))
    return state


def _listing(kind: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
    return f"{len(keys)} {kind} keys: {shown}. "


def load_into(model: nn.Module, path: str | Path, checkpoint_key: str | None = None, head: str = "new",
              class_map: str | None = None, relpos_interpolation: str = "geometric") -> Pretrained:
    """Read ``path``, adapt it to ``model`` and load it; returns what was read (with its layout)."""
    pretrained = load(path, set(model.state_dict()), checkpoint_key)
    state = fit_to_model(pretrained, model, head, class_map, relpos_interpolation)
    model.load_state_dict(state, strict=False)  # fit_to_model checked every key; only a new head is left out
    log.info("loaded %s (%s) into %s", pretrained.source, pretrained.layout, type(model).__name__)
    return pretrained


def resolve_model(model: ModelConfig, path: str | Path | None) -> ModelConfig:
    """``model`` with the name and architecture the source describes (a vitscale export or run).

    The config's own ``model.kwargs`` win over the stored ones, so a recipe can change what may
    change (``window_size`` for Swin at a new resolution); size and classes come from the stage.
    """
    described = describe(path) if path else None
    if described is None:
        return model
    name, kwargs = described
    stored = {k: v for k, v in kwargs.items() if k not in ("img_size", "num_classes", "drop_path_rate")}
    return dataclasses.replace(model, name=name, kwargs={**stored, **model.kwargs})
