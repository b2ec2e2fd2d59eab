"""A momentum teacher: frozen copies of student modules that follow an EMA of the student's fp32
master weights (DINO's teacher, MoBY's target encoder and projector).

The teacher lives inside the objective, so DeepSpeed treats it like the student: cast to the
compute dtype, and partitioned under ZeRO-3. Its exact state is a separate fp32 buffer, ``master``:

* ZeRO-3: each rank holds the EMA of its own partition only, laid out like the student's fp32
  partition, and writes it into its own partition of the teacher. No communication, 1/world of an
  fp32 teacher per rank. With the optimizer state on NVMe (``engine.offload_path``) the masters are
  on disk, and the EMA follows the student's bf16 partition instead.
* ZeRO-1/2: each rank updates the fragment of the master it owns from the optimizer's fp32
  fragment, then one all-gather of the packed fragments makes every rank's full teacher (which these
  stages replicate anyway) identical.
* bf16 without ZeRO: every rank holds whole fp32 masters; a local EMA.
* fp32 without ZeRO: the parameters are the masters; a local EMA.

Only trainable student parameters are followed: frozen ones never change, so the teacher's copy,
made at construction, already equals their EMA. ``master`` is a plain fp32 buffer of the
objective's state dict, which DeepSpeed writes from rank 0 (replicated layouts) or from every rank
into its own file (ZeRO-3); the teacher's weights are left out of it and rebuilt from ``master``
on load, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from timm.layers import DropPath

from pretrain.dist import DistEnv
from pretrain.engine import (is_partitioned, kept_whole, local_shard, partitioned_numel, partitioned_shape,
                             refresh_gathered)


class MomentumTeacher(nn.Module):
    def __init__(self, students: dict[str, nn.Module], dist: DistEnv,
                 builders: dict[str, Callable[[], nn.Module]]) -> None:
        """``builders[name]()`` builds a module shaped like ``students[name]``: the teacher's copy.

        A copy is built rather than deep-copied because a student built under ZeRO-3's
        ``zero.Init`` is already partitioned: built in the same context, the copy is partitioned the
        same way and takes the student's values partition by partition, never whole on a rank."""
        super().__init__()
        self.dist = dist
        self.nets = nn.ModuleDict({name: _copy_of(module, builders[name], dist) for name, module in students.items()})
        for module in self.nets.modules():
            if isinstance(module, DropPath):
                module.drop_prob = 0.0  # the teacher never drops paths (MoBY's asymmetric drop path)
        for p in self.nets.parameters():
            p.requires_grad_(False)
        pairs = [(s, t) for m in students for s, t in zip(students[m].parameters(), self.nets[m].parameters())
                 if s.requires_grad]
        # Plain lists: the student's parameters must not be registered a second time.
        self._students = [s for s, _ in pairs]
        self._teachers = [t for _, t in pairs]
        self._numels = [partitioned_numel(s) for s in self._students]
        # Filled at the first update, from the teacher's weights as DeepSpeed holds them then: the
        # same values (cast once to the compute dtype) that it started the student's fp32 masters
        # from. ``ready`` says whether it holds a state (restored by a load, or made).
        self.register_buffer("master", torch.empty(0))
        self.register_buffer("ready", torch.zeros((), dtype=torch.uint8))
        self._bound = None
        # The compute weights are ``master`` cast once: checkpoints hold ``master`` only, and a load
        # rebuilds the weights from it (under ZeRO-3 DeepSpeed's own view of these frozen, partly
        # "persistent" parameters in a saved state dict is not a reliable copy of them).
        self._weight_keys = {f"nets.{name}" for name, _ in self.nets.named_parameters()}
        self.register_state_dict_post_hook(_drop_weights)
        self.register_load_state_dict_post_hook(_rebuild_weights)

    def forward(self, name: str, *args, **kwargs):
        with torch.no_grad():
            return self.nets[name](*args, **kwargs)

    # -- the update -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, momentum: float, engine) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, on fp32 master weights, where
        the optimizer step was applied (``engine.applied()``, a device flag: a skipped step leaves
        the teacher exactly as it was, without a host sync to find out).

        Call after every optimizer step, on every rank (ZeRO-1/2 and ZeRO-3 use collectives).
        """
        if self._bound is None:
            self._bound = self._bind(engine)
        b = self._bound
        # A 0-d device tensor, exactly 0 where the step was skipped. torch's foreach lerp takes its
        # weight as a number only (a host read), so the update is state += weight * (master - state)
        # in chunks, each holding one chunk's differences at a time.
        weight = engine.applied() * (1.0 - momentum)
        for states, masters in _chunks(b.states, b.masters):
            deltas = torch._foreach_sub([m.float() for m in masters], states)
            torch._foreach_mul_(deltas, weight)
            torch._foreach_add_(states, deltas)
        if b.exchange is not None:
            b.exchange()
        torch._foreach_copy_(b.shards, b.sources)
        if b.refresh is not None:
            b.refresh()

    def _bind(self, engine) -> "_Views":
        """Views of the master buffer, the student's fp32 masters and the teacher's storage."""
        slices = engine.master_slices(self._students)
        partitioned = bool(slices) and all(s.partitioned for s in slices)
        if not self.ready:
            shards = [local_shard(t) if partitioned else t.data.view(-1) for t in self._teachers]
            self.master = torch.cat(shards).float()
            self.ready.fill_(1)
        if partitioned:
            sizes = [len(s.values) for s in slices]
            states = list(torch.split(self.master, sizes))
            return _Views(states, [s.values for s in slices], [local_shard(t) for t in self._teachers], states,
                          None, _PersistentRefresh(self._teachers, self.dist))
        per_param = torch.split(self.master, self._numels)
        offsets = [0]
        for n in self._numels[:-1]:
            offsets.append(offsets[-1] + n)
        states, masters, fragments = [], [], []
        for state, offset, s in zip(per_param, offsets, slices):
            if s.values is not None:
                states.append(state[s.start:s.start + len(s.values)])
                masters.append(s.values)
                fragments.append((offset + s.start, len(s.values)))
        owned = sum(size for _, size in fragments)
        exchange = _FragmentExchange(self.master, states, fragments, self.dist) \
            if owned < self.master.numel() else None
        return _Views(states, masters, [t.data.view(-1) for t in self._teachers], list(per_param), exchange, None)

    def full_master(self, main_only: bool = False) -> list[torch.Tensor | None]:
        """Every followed parameter's full fp32 teacher weights (a collective under ZeRO-3, one
        parameter at a time). ``main_only``: only the main rank keeps them (None elsewhere)."""
        shapes = [partitioned_shape(t) for t in self._teachers]
        keep = self.dist.is_main or not main_only
        if not self._partitioned:
            return [m.view(shape) if keep else None
                    for m, shape in zip(torch.split(self.master, self._numels), shapes)]
        out = []
        sizes = [local_shard(t).numel() for t in self._teachers]
        for part, n, shape in zip(torch.split(self.master, sizes), self._numels, shapes):
            whole = self.dist.all_gather_cat(part)  # rank r's partition at r * size, padded at the end
            out.append(whole[:n].view(shape) if keep else None)
        return out

    def full_state_dict(self, name: str, main_only: bool = False) -> dict[str, torch.Tensor]:
        """Teacher module ``name``'s state dict from the fp32 masters, on the CPU (a collective under
        ZeRO-3; call on every rank after at least one update or load). ``main_only``: the other
        ranks get an empty dict and never hold the whole module."""
        masters = {id(t): m for t, m in zip(self._teachers, self.full_master(main_only))}
        if main_only and not self.dist.is_main:
            return {}
        params = {n: masters[id(p)] for n, p in self.nets[name].named_parameters() if id(p) in masters}
        out = {}
        for key, value in self.nets[name].state_dict().items():
            if key in params:
                whole = params[key].detach().float().cpu()
                # Gathered partitions are fresh tensors already (a second copy of a 4 GB teacher
                # ended a ViT-g export); views of ``master`` are copied.
                out[key] = whole if self._partitioned else whole.clone()
            elif value.numel() == 0 and "." in key:
                raise RuntimeError(f"teacher {name}: {key} is partitioned and not followed; cannot export it")
            else:
                out[key] = value.detach().cpu().clone()
        return out

    # -- checkpoints ----------------------------------------------------------------------------------
    partitioned_buffers = ("master",)  # under ZeRO-3 each rank saves its own part (see merge_partitions)

    def merge_partitions(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """The whole ``master`` from the ``master`` each rank saved, in rank order: ZeRO-3 partitions
        (each rank's padded share of every followed parameter, in turn), or whole copies."""
        assert name == "master"
        world, total = len(parts), sum(self._numels)
        if parts[0].numel() in (0, total):  # not started yet, or replicated (ZeRO-0/1/2)
            return parts[0]
        sizes = [-(-n // world) for n in self._numels]
        if any(p.numel() != sum(sizes) for p in parts):
            raise RuntimeError(f"teacher partitions of {[p.numel() for p in parts]} elements do not split "
                               f"{total} followed weights over {world} ranks")
        per_rank = [torch.split(p, sizes) for p in parts]
        return torch.cat([torch.cat([pieces[i] for pieces in per_rank])[:n] for i, n in enumerate(self._numels)])

    def _own_partition(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's ZeRO-3 partition of a whole ``master`` (zero-padded like DeepSpeed's)."""
        rank, out = self.dist.rank, []
        for t, piece in zip(self._teachers, torch.split(whole, self._numels)):
            size = local_shard(t).numel()
            mine = piece[rank * size:(rank + 1) * size]
            out.append(torch.cat([mine, mine.new_zeros(size - len(mine))]))
        return torch.cat(out) if out else whole

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "master")
        if saved is not None and self._partitioned and self.dist.world_size > 1 and \
                saved.numel() == sum(self._numels) != sum(local_shard(t).numel() for t in self._teachers):
            saved = state_dict[prefix + "master"] = self._own_partition(saved)  # whole, re-sharded on resume
        if saved is not None and saved.shape != self.master.shape:
            self.master = torch.empty_like(saved, device=self.master.device)  # a ZeRO-3 partition
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bound = None  # the optimizer's buffers may be new after a load

    @torch.no_grad()
    def _refresh_weights(self) -> None:
        """The teacher's compute weights from ``master``, after a load."""
        if not self.ready:
            return
        sizes = [local_shard(t).numel() for t in self._teachers] if self._partitioned else self._numels
        for t, state in zip(self._teachers, torch.split(self.master, sizes)):
            local_shard(t).copy_(state)
        refresh_gathered(self._teachers)

    @property
    def _partitioned(self) -> bool:
        """ZeRO-3: ``master`` holds this rank's partitions, laid out as the teacher's."""
        return bool(self._teachers) and is_partitioned(self._teachers[0])


# Elements per chunk of the teacher's update: its differences then take at most 256 MiB (fp32).
UPDATE_CHUNK = 2**26


def _chunks(states: list[torch.Tensor], masters: list[torch.Tensor]):
    """(states, masters) in consecutive chunks of about :data:`UPDATE_CHUNK` elements."""
    start, size = 0, 0
    for i, state in enumerate(states):
        size += state.numel()
        if size >= UPDATE_CHUNK:
            yield states[start:i + 1], masters[start:i + 1]
            start, size = i + 1, 0
    if start < len(states):
        yield states[start:], masters[start:]


def _copy_of(student: nn.Module, build: Callable[[], nn.Module], dist: DistEnv) -> nn.Module:
    """A module built by ``build`` holding ``student``'s values (this rank's partitions under ZeRO-3)."""
    devices = [dist.device] if dist.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the copy's own initialization leaves the run's streams alone
        copy = build()
    params, copied = list(student.parameters()), list(copy.parameters())
    shapes = [tuple(partitioned_shape(p)) for p in params]
    if shapes != [tuple(partitioned_shape(p)) for p in copied]:
        raise ValueError(f"the teacher's builder made a module of another shape than the student's: {type(copy)}")
    with torch.no_grad():
        for s, t in zip(params, copied):
            local_shard(t).copy_(local_shard(s))
        for s, t in zip(student.buffers(), copy.buffers()):
            t.copy_(s)
    return copy


def _drop_weights(module: MomentumTeacher, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in module._weight_keys]:
        del state_dict[key]


def _rebuild_weights(module: MomentumTeacher, incompatible) -> None:
    """After the whole teacher (children included) is loaded: weights from ``master``."""
    prefixes = [k for k in incompatible.missing_keys if any(k.endswith("." + w) or k == w
                                                             for w in module._weight_keys)]
    for key in prefixes:
        incompatible.missing_keys.remove(key)
    module._refresh_weights()


class _FragmentExchange:
    """ZeRO-1/2: every rank's freshly updated fragments of ``master`` into every rank's copy, with
    one all-gather of the packed fragments. An all-reduce of the whole buffer, zero outside each
    rank's fragments, gives the same result; a ring all-gather moves half its bytes (it is the
    second half of a ring all-reduce) and needs no zeroed scratch buffer. On 2 CPU processes
    (gloo, shared memory) the two take the same time."""

    def __init__(self, master: torch.Tensor, states: list[torch.Tensor], fragments: list[tuple[int, int]],
                 dist: DistEnv) -> None:
        self.dist, rank = dist, dist.rank
        layouts = dist.gather_objects(fragments)  # (offset, size) in ``master`` of each rank's fragments
        size = max(sum(n for _, n in layout) for layout in layouts)
        self.send = master.new_zeros(size)
        self.received = master.new_empty(dist.world_size * size)
        self.states = states
        sizes = [n for _, n in fragments]
        self.packed = list(torch.split(self.send[:sum(sizes)], sizes))  # this rank's fragments, in order
        self.targets, self.sources = [], []
        for other, layout in enumerate(layouts):
            position = other * size
            for offset, n in layout:
                if other != rank:
                    self.targets.append(master[offset:offset + n])
                    self.sources.append(self.received[position:position + n])
                position += n

    def __call__(self) -> None:
        torch._foreach_copy_(self.packed, self.states)
        self.dist.all_gather_into(self.received, self.send)
        torch._foreach_copy_(self.targets, self.sources)


class _PersistentRefresh:
    """ZeRO-3 keeps small parameters ("persistent": biases, norms, tokens) whole on every rank next
    to their partitions. After the partitions are written, one all-gather of all of them, packed,
    refreshes the whole copies. (DeepSpeed's own refresh, ``refresh_gathered``, does bookkeeping
    and a collective per parameter: for a ViT, whose small parameters are two thirds of its
    tensors, that was most of the teacher's update.)"""

    def __init__(self, params: list[nn.Parameter], dist: DistEnv) -> None:
        self.params = [p for p in params if kept_whole(p)]
        self.dist, self.world = dist, dist.world_size
        self.shards = [local_shard(p) for p in self.params]
        self.sizes = [s.numel() for s in self.shards]
        self.total = sum(self.sizes)
        if self.params:
            self.send = self.shards[0].new_empty(self.total)
            self.received = self.shards[0].new_empty(self.world * self.total)
            self.packed = list(torch.split(self.send, self.sizes))

    def __call__(self) -> None:
        if not self.params:
            return
        torch._foreach_copy_(self.packed, self.shards)
        self.dist.all_gather_into(self.received, self.send)
        # The whole copies are looked up each time: DeepSpeed may re-make them between steps.
        targets, sources = [], []
        offset = 0
        for p, size in zip(self.params, self.sizes):
            full = p.data.view(-1)
            for rank in range(self.world):  # rank r holds elements [r * size, (r + 1) * size), padded
                start, stop = rank * size, min((rank + 1) * size, full.numel())
                if stop > start:
                    at = rank * self.total + offset
                    targets.append(full[start:stop])
                    sources.append(self.received[at:at + stop - start])
            offset += size
        torch._foreach_copy_(targets, sources)


@dataclass
class _Views:
    states: list[torch.Tensor]  # the parts of ``master`` this rank updates
    masters: list[torch.Tensor]  # the student's fp32 masters, same shapes
    shards: list[torch.Tensor]  # the teacher's local storage, per parameter
    sources: list[torch.Tensor]  # what each shard is copied from
    exchange: _FragmentExchange | None  # replicated layouts where each rank owns a fragment of the masters
    refresh: _PersistentRefresh | None  # ZeRO-3
