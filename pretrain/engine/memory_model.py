"""What one rank holds while training: ZeRO's model states per parameter, and the activations of a
micro-batch.

Model states depend on the ZeRO stage, the number of ranks N, whether the weights are fp32
(``autocast``: fp32 weights with torch.autocast computing in engine.precision, or engine.precision
fp32) or DeepSpeed's 16-bit weights with fp32 masters, and what ZeRO-Offload moves to host memory.
Bytes per trainable parameter, Adam (two fp32 moments, 8 B):

=========  ==========================  ===========================
stage      autocast (fp32 weights)     16-bit weights (bf16, fp16)
=========  ==========================  ===========================
ZeRO-0     4 + 4 + 8 = 16              2 + 2 + 12 = 16
ZeRO-1     4 + 4 + (4 + 8) / N         2 + 2 + 12 / N
ZeRO-2     4 + (4 + 4 + 8) / N         2 + (2 + 12) / N
ZeRO-3     (4 + 4 + 4 + 8) / N         (2 + 2 + 12) / N
=========  ==========================  ===========================

(weights + gradients + fp32 masters + Adam). With fp32 weights ZeRO-0 steps the weights themselves;
from ZeRO-1 on DeepSpeed steps a flat fp32 copy of this rank's partition (4 / N) and keeps its
gradient there, which ZeRO-2 and 3 hold instead of the whole gradients. ZeRO-1 holds whole
gradients until the end of the backward pass, when they are reduced into the partitions: that is
its peak. The 16-bit column is the ZeRO paper's (Rajbhandari et al. 2020). ``engine.offload``
moves the masters and Adam's moments to host memory (``optimizer``), and ZeRO-3's weight
partitions too (``all``); the gradients stay counted on the device, where DeepSpeed reduces them
before copying them out (an upper bound). ``python -m pretrain.bench memory`` measures both columns.

A momentum teacher's parameters are frozen: each holds its compute copy (weights' bytes) and an fp32
EMA state (4 B), both partitioned at ZeRO-3; at ZeRO-1/2 each rank updates its fragment of the state
and an all-gather assembles it, through buffers of 4 + 4 / N B per parameter (pretrain.models.teacher).

Activations: what the backward pass needs of a micro-batch is, per transformer block, about 18
values per token and channel (block input, norms, q/k/v, attention output, the MLP's input, its
hidden layer twice at mlp_ratio 4), measured with torch's saved-tensor hooks on ViT-S/B and Swin-T
(fused attention): 68-75 B per token x width x block in fp32, 35-44 B in bf16 (norms and the residual
stream stay fp32 under autocast). With activation checkpointing each block keeps its input (measured
8-11 B in fp32) and one block's are rebuilt at a time in the backward pass. The heads are left out:
next to the backbone they are small.
"""

from __future__ import annotations

from dataclasses import dataclass

ADAM_BYTES = 8  # two fp32 moments
MASTER_BYTES = 4  # an fp32 copy of the weights
TEACHER_STATE_BYTES = 4  # a momentum teacher's fp32 EMA of each followed parameter
AUTOCAST_COPY_BYTES = 2  # torch.autocast's cached 16-bit copy of each trainable weight, forward to backward

# Activation bytes per token x channel x block (see the module's docstring for the measurements).
ACTIVATION_BYTES_FP32 = 72
ACTIVATION_BYTES_16BIT = 40
CHECKPOINTED_BYTES = 8  # a checkpointed block's input, kept until its backward (the residual stream in fp32)


@dataclass(frozen=True)
class StateBytes:
    """Bytes per trainable parameter that one rank holds on its device, by what holds them."""

    weights: float
    gradients: float
    masters: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.masters + self.optimizer


def model_state_bytes(stage: int, world_size: int, autocast: bool, offload: str = "none") -> StateBytes:
    """Model states per trainable parameter on one rank's device at their peak (module docstring).

    ``autocast``: fp32 weights (autocast, or engine.precision fp32) rather than DeepSpeed's 16-bit
    weights; ``offload``: engine.offload (``none``, ``optimizer``, ``all``)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}: must be 0, 1, 2 or 3")
    n = world_size
    weight = 4 if autocast else 2
    weights = weight / n if stage == 3 else weight
    gradients = weight / n if stage >= 2 else weight
    if stage == 0:
        masters = 0.0 if autocast else MASTER_BYTES  # fp32 weights are their own masters
        optimizer = float(ADAM_BYTES)
    else:
        masters, optimizer = MASTER_BYTES / n, ADAM_BYTES / n
    if offload != "none":
        masters = optimizer = 0.0
    if offload == "all":
        weights = 0.0
    return StateBytes(weights, gradients, masters, optimizer)


def frozen_bytes(stage: int, world_size: int, autocast: bool) -> float:
    """Bytes of a frozen parameter's compute copy on one rank (a momentum teacher's weights)."""
    return (4 if autocast else 2) / (world_size if stage == 3 else 1)


def teacher_state_bytes(stage: int, world_size: int) -> float:
    """Bytes of a momentum teacher's fp32 EMA state per followed parameter on one rank: partitioned at
    ZeRO-3; whole otherwise, and at ZeRO-1/2 with the buffers that exchange the fragments each rank
    updates (its own packed, 4 / N, and every rank's gathered, 4)."""
    if stage == 3:
        return TEACHER_STATE_BYTES / world_size
    return TEACHER_STATE_BYTES + (TEACHER_STATE_BYTES + TEACHER_STATE_BYTES / world_size if stage > 0 else 0)


def activation_bytes(block_tokens_x_width: list[int], micro_batch: int, fp32_compute: bool,
                     checkpointing: bool) -> int:
    """Activations one micro-batch keeps for its backward pass: ``block_tokens_x_width`` holds, for
    each transformer block an image's views pass through, tokens x channels of its output (one
    sample's; a block run on three views appears three times)."""
    if not block_tokens_x_width:
        return 0
    per_unit = ACTIVATION_BYTES_FP32 if fp32_compute else ACTIVATION_BYTES_16BIT
    if checkpointing:
        per_sample = CHECKPOINTED_BYTES * sum(block_tokens_x_width) + per_unit * max(block_tokens_x_width)
    else:
        per_sample = per_unit * sum(block_tokens_x_width)
    return int(micro_batch * per_sample)
