"""A run's state, saved and resumed: the one owner of checkpoints.

- :mod:`~pretrain.state.stateful`: the contract a component of a run keeps (state to save, state to
  load, re-sharding onto another number of processes);
- :mod:`~pretrain.state.checkpointer`: what goes into a checkpoint and into whom it is loaded back;
- the layout on disk: :mod:`~pretrain.state.layout` (names, ``meta.json``, checksums),
  :mod:`~pretrain.state.checkpoints` (cadence, writing whole, ``latest``, verifying, pruning),
  :mod:`~pretrain.state.conversion` (where a re-sharded conversion is kept) and
  :mod:`~pretrain.state.reading` (a checkpoint read for its weights: ``finetune``,
  :mod:`pretrain.run_backbone`).

The engine writes and reads its own shards (:mod:`pretrain.engine.checkpoint_io`), and only it knows
DeepSpeed's file names. Nothing is imported here, so that a look at the layout (pretrain.plan,
before any process starts) imports the layout alone.
"""
