"""The engine: the only package that imports DeepSpeed.

What the rest of vitscale asks of an engine (the trainer, the objectives, the checkpointer, the
benchmarks), so that a second engine (PyTorch's FSDP2) would be one more module behind it:

- building: :func:`build_module` (the model, partitioned from the start where the engine shards
  parameters), then ``Engine(module, param_groups, cfg, dist)``;
- one step: ``forward``, ``backward``, ``step(skip, measure_grad_norm)`` (``skip`` a device flag:
  nothing waits for the device), ``applied()`` and ``nonfinite_gradients`` (its verdicts, on the
  device), ``set_hyperparameters``, ``fp16_overflow``, ``grad_norm``, ``autocast()``; ``train`` / ``eval``;
- the fp32 master weights: ``master_slices`` (what a momentum teacher follows, no communication),
  ``full_fp32_state_dict`` (whole, a collective), ``weights_finite``;
- its shards of a checkpoint: ``save(directory, tag, client_state) -> files written``,
  ``load(directory, tag) -> client_state``, and for a checkpoint of another number of processes
  (``reshards(saved_world_size)``) :func:`write_universal` of a conversion and
  ``load_universal(directory) -> client_state``; reading one whole (:func:`checkpoint_fp32_weights`,
  :func:`merged_buffers`), weights-only. The layout around them (meta data, checksums, ``latest``,
  where a conversion is kept) is pretrain.state's; only this package knows DeepSpeed's file names;
- parameters as built, also when partitioned: :func:`partitioned_shape`, :func:`partitioned_numel`,
  :func:`local_shard`, :func:`is_partitioned`, :func:`kept_whole`, :func:`refresh_gathered`.

One module per concern: ``config`` (the DeepSpeed config and its checks), ``memory_model`` (what a rank
holds per parameter and per micro-batch, for each stage and precision), ``precision``,
``optimizer`` (and its groups), ``device_skip`` (a step skipped without a host read), ``partitions``, ``masters``, ``clipping``, ``compilation``,
``checkpoint_io`` and ``universal`` (its shards, and re-sharding them), ``deepspeed_engine``.
"""

from pretrain.engine.checkpoint_io import (MODEL_STATES, checkpoint_fp32_weights, holds_shards, merged_buffers,
                                           naming_refused_files, refused_file_error, weights_only_loading,
                                           zero_checkpoint_fp32_weights)
from pretrain.engine.config import check_deepspeed_overrides, check_offload, deepspeed_config, offload_config
from pretrain.engine.deepspeed_engine import Engine
from pretrain.engine.imports import import_deepspeed
from pretrain.engine.optimizer import SkippableAdamW
from pretrain.engine.partitions import (MasterSlice, build_module, is_partitioned, kept_whole, local_shard,
                                        partitioned_numel, partitioned_shape, refresh_gathered)
from pretrain.engine.precision import (check_accelerator, compute_dtype, describe_precision, loss_scale_state,
                                       report_loss_scale_floor_in_trainer, resolve_autocast, weights_dtype)
from pretrain.engine.universal import NoAdamMoments, write_universal

__all__ = ["MODEL_STATES", "Engine", "MasterSlice", "NoAdamMoments", "SkippableAdamW", "build_module",
           "check_accelerator", "check_deepspeed_overrides", "check_offload", "checkpoint_fp32_weights",
           "compute_dtype", "deepspeed_config", "describe_precision", "holds_shards", "import_deepspeed", "is_partitioned", "kept_whole",
           "local_shard", "loss_scale_state", "merged_buffers", "naming_refused_files", "offload_config",
           "partitioned_numel", "partitioned_shape", "refresh_gathered", "refused_file_error",
           "report_loss_scale_floor_in_trainer", "resolve_autocast", "weights_dtype", "weights_only_loading", "write_universal",
           "zero_checkpoint_fp32_weights"]
