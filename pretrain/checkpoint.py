"""The error every reader and writer of checkpoints raises.

The checkpoints themselves (their layout on disk, what goes into them, resuming) are
:mod:`pretrain.state`; the engine's own shards are :mod:`pretrain.engine.checkpoint_io`; the
backbone's export is :mod:`pretrain.export`. The error lives here, below the engine and the state,
because both raise it: a module that imports neither.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; the message names the file."""
