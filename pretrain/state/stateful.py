"""What a component of a run offers the checkpointer: its state to save, the state to load, and how a
state saved by another number of processes re-shards onto this one.

The checkpointer (:mod:`pretrain.state.checkpointer`) is handed the components by name and saves
each one's ``state_dict()`` under its name, so that adding state to a component touches that
component only. The trainer's own step, the step guard's counts, the metrics window's partial sums
and the data position (:class:`pretrain.data.position.DataPosition`) are components.

The objective's state is not: its weights, optimizer state and buffers (a momentum teacher's fp32
``master``, DINO's and DINOv2's centres, MoBY's queues) are module state, and travel in the engine's
shards. They fulfil the same contract through the module: ``state_dict`` is the module's, written
by the engine (from rank 0 where they are replicated, from every rank where ZeRO-3 partitions the
teacher's master); ``load_state_dict`` is the module's (the teacher rebuilds its weights from its
master, MoBY's queue pointer is checked); and re-sharding happens when a ZeRO checkpoint of another
world size is converted (:mod:`pretrain.state.conversion`): the conversion's ``buffers.pt`` holds
every buffer whole, a partitioned one merged from its parts by the module that owns it
(``partitioned_buffers`` and ``merge_partitions``, :class:`pretrain.models.teacher.MomentumTeacher`),
and each rank's module takes its own share on load.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict:
        """The state to save, picklable. Every rank loads rank 0's copy back (the engine keeps one
        below ZeRO-3), so what differs by rank is gathered into it: a collective, which the
        checkpointer calls on every rank at the same point of a save."""

    def load_state_dict(self, state: dict) -> None:
        """Take up ``state`` on this rank: as saved, or as :meth:`reshard` made it."""

    def reshard(self, state: dict, saved_world_size: int) -> dict:
        """What this rank loads of ``state``, saved by a run on ``saved_world_size`` processes. Called
        only when the number of processes changed; state that is the same on every rank returns it
        unchanged."""
