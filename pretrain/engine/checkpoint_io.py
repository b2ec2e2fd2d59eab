"""The engine's own shards of a checkpoint: written and read through DeepSpeed's checkpoint engine,
weights-only (a file that would run code on load is refused, naming it), and read whole as fp32.
"""

from __future__ import annotations

import os
import pickle
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from pretrain.engine.imports import import_deepspeed
from pretrain.errors import CheckpointError


MODEL_STATES = "*model_states.pt"  # every DeepSpeed checkpoint has one or (ZeRO-3) one per rank
OPTIMIZER_STATES = "*optim_states.pt"  # ZeRO's partitions of the optimizer state and fp32 masters


def holds_shards(path: Path) -> bool:
    """Whether directory ``path`` is one checkpoint of DeepSpeed's (a tag directory), vitscale's or not."""
    return any(path.glob(MODEL_STATES))


def zero_checkpoint_fp32_weights(directory: str | os.PathLike, tag: str) -> dict:
    """The fp32 weights of a DeepSpeed checkpoint with ZeRO optimizer states, gathered from its
    partitions by DeepSpeed's own ``zero_to_fp32`` (on its CPU accelerator without a GPU)."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)


def checkpoint_fp32_weights(directory: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The weights of DeepSpeed checkpoint ``directory/tag`` in fp32, whole: gathered from its ZeRO
    partitions, or (ZeRO stage 0, no optimizer-state files) its model states as saved. Call it inside
    :func:`weights_only_loading`."""
    tag_dir = Path(directory) / tag
    if any(tag_dir.glob(OPTIMIZER_STATES)):
        state = zero_checkpoint_fp32_weights(directory, tag)
        return {k: v for k, v in state.items() if torch.is_tensor(v)}
    files = sorted(tag_dir.glob(MODEL_STATES))
    if not files:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model states in this checkpoint")
    states = torch.load(files[0], map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers: the loss
    scalers (ZeRO-1/2 and fp16 state), ZeRO's stage enum and fragment addresses (ZeRO optimizer
    states). Plain data holders: rebuilding them runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loading():
    """Inside, every ``torch.load`` reads weights only, with :func:`deepspeed_safe_globals` allowed.

    DeepSpeed's loaders ask torch for full unpickling (``weights_only=False``), which runs whatever a
    file's pickle names; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that at every call site,
    DeepSpeed's own ``torch.load`` calls included. A refused file raises ``pickle.UnpicklingError``.
    """
    saved = {name: os.environ.get(name) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                      "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # torch refuses both set
    allowed = deepspeed_safe_globals()
    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if scoped is None:
        torch.serialization.add_safe_globals(allowed)
    try:
        with scoped(allowed) if scoped is not None else nullcontext():
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def refused_file_error(path: str, error: Exception) -> CheckpointError:
    """The error for a checkpoint file that weights-only loading refused, naming the file."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's message opens with advice to unpickle fully; the line naming what it refused says more.
    detail = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(error).__name__)
    return CheckpointError(f"{path}: refused: loading it would unpickle more than weights ({detail}), which could "
                           f"run code; vitscale loads checkpoints weights-only. Load only checkpoints you trust "
                           f"with DeepSpeed directly; nothing of this file was run")


@contextmanager
def naming_refused_files():
    """Inside, a file that weights-only loading refuses raises the CheckpointError naming it, also
    where DeepSpeed calls ``torch.load`` itself rather than through its checkpoint engine (the
    universal conversion)."""
    load = torch.load

    def load_naming_refused_file(f, *args, **kwargs):
        try:
            return load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise refused_file_error(str(f), e) from None

    torch.load = load_naming_refused_file
    try:
        yield
    finally:
        torch.load = load


def _rank_of(path: Path) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(found.group(1)) if found else 0


def merged_buffers(checkpoint: Path, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s buffers as saved in ``checkpoint``, whole: rank 0's copy, except buffers that
    each rank saved its own part of (a ZeRO-3 momentum teacher's master), which the module that owns
    them merges (``merge_partitions(name, parts)``, parts in rank order)."""
    files = sorted(checkpoint.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank_of) or \
        [checkpoint / "mp_rank_00_model_states.pt"]
    owners = {f"{prefix}.{name}" if prefix else name: (m, name)
              for prefix, m in module.named_modules() for name in getattr(m, "partitioned_buffers", ())}
    names = {name for name, _ in module.named_buffers()}
    merged, parts = {}, {key: [] for key in owners}
    for index, file in enumerate(files):
        saved = torch.load(file, map_location="cpu", weights_only=True)["module"]
        if index == 0:
            merged = {k: v for k, v in saved.items() if k in names}
        for key in owners:
            if key in saved:
                parts[key].append(saved[key])
        del saved
    for key, (owner, name) in owners.items():
        if parts[key]:
            merged[key] = owner.merge_partitions(name, parts[key])
    return merged


class ShardFiles:
    """What this rank's engine writes and reads through DeepSpeed's checkpoint engine: the files a save
    wrote (for their checksums), and, on a load that weights-only loading refuses, the file's name.
    DeepSpeed reads and writes every checkpoint file through its checkpoint engine's
    ``save(state, path)`` and ``load(path, map_location)``."""

    def __init__(self, checkpoint_engine) -> None:
        self.written: list[str] = []
        save, load = checkpoint_engine.save, checkpoint_engine.load

        def save_and_record(state_dict, path, *args, **kwargs):
            self.written.append(str(path))
            return save(state_dict, path, *args, **kwargs)

        def load_naming_refused_files(path, *args, **kwargs):
            try:
                return load(path, *args, **kwargs)
            except pickle.UnpicklingError as e:
                raise refused_file_error(str(path), e) from None

        checkpoint_engine.save, checkpoint_engine.load = save_and_record, load_naming_refused_files

    def save(self, ds_engine, directory: str, tag: str, client_state: dict) -> list[str]:
        """Write this rank's share of checkpoint ``tag``; the paths of the files it wrote."""
        self.written = []
        ds_engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
        return list(self.written)


def load_keeping_group_settings(optimizer: torch.optim.Optimizer, load: Callable[[], dict], where: str) -> dict:
    """``load()`` (a DeepSpeed load of checkpoint ``where``), weights-only, keeping the optimizer's
    param-group settings; returns its client state.

    A checkpoint's param groups carry the settings of the run that wrote them (torch's
    load_state_dict copies them over ours; DeepSpeed's universal load copies the first group's into
    every group); ours (lr scale, weight decay on or off, how and how long a group is frozen) come
    from the config, so that a checkpoint written before a setting existed (a DINOv2 freeze by
    skipping, now by lr 0) resumes with the config's."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        with weights_only_loading():
            client_state = load()
    except pickle.UnpicklingError as e:  # a torch.load outside the checkpoint engine
        raise refused_file_error(where, e) from None
    for group, own in zip(optimizer.param_groups, settings):
        params = group["params"]
        group.clear()
        group.update(own, params=params)
    return client_state
