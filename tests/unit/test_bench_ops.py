"""bench ops counts what a step dispatches: every aten op, and every host read of a tensor's values
(item, tolist, and ops whose output size depends on the values) with the line that asked for it; the
warm-up and the logging step are left out. Its bare loops compute vitscale's maths the official way,
and train; its report's ratio lines name the worst row of each kind."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.bench import bare_steps
from pretrain.bench.ops import counted, report
from pretrain.config import load_config
from pretrain.dist import DistEnv
from pretrain.objectives import dino, dinov2, moby
from tests.conftest import TINY_SWIN, TINY_VIT


def test_ops_and_host_syncs_are_counted_per_step_with_their_line():
    x = torch.ones(4)
    steps = 4

    def run(mark):
        for step in range(steps):
            mark()
            y = (x * 2 + 1).sum()  # 3 ops
            y.item()  # one sync: _local_scalar_dense
            x.tolist()  # one sync without an aten op on a CPU tensor
            if step == steps - 1:  # the logging step, not counted
                y.item()
            if step < 2:  # the warm-up steps (ZeRO-3 records its trace in the second), not counted
                x.abs()

    result = counted(run, steps)
    assert result["ops"] == 4  # mul, add, sum, _local_scalar_dense
    where = {what.split(" at ")[0]: what.split(" at ")[1] for what in result["syncs"]}
    assert set(result["syncs"].values()) == {1.0} and set(where) == {"_local_scalar_dense", "tolist"}
    assert all(line.startswith("tests/unit/test_bench_ops.py:") for line in where.values()), where


def test_value_dependent_sizes_are_syncs_and_integer_indexing_is_not():
    x, mask, index = torch.arange(4.0), torch.tensor([True, False, True, False]), torch.tensor([0, 2])

    def run(mark):
        for _ in range(4):
            mark()
            x[mask]  # the host needs the count of True before it can size the output
            x[index]  # sized by the index: no sync
            mask.nonzero()

    syncs = {what.split(" at ")[0] for what in counted(run, 4)["syncs"]}
    assert syncs == {"index (bool mask)", "nonzero"}


def test_the_counter_lets_torch_compile_compile_and_dynamo_is_counted():
    """Under a dispatch mode torch.compile runs frames eagerly unless the mode ignores compile internals."""
    def f(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()
    compiled = torch.compile(f, backend="eager")

    def run(mark):
        for _ in range(4):
            mark()
            compiled(torch.ones(3))

    dynamo = counted(run, 4)["dynamo"]
    assert dynamo["graphs"] == 2 and dynamo["graph_breaks"] == 1 and dynamo["recompiles"] == 0, dynamo


# -- the bare loops -------------------------------------------------------------------------------------------
TINY = {
    "supervised": [*TINY_VIT, "data.num_classes=10"],
    "dino": ["objective.name=dino", *TINY_VIT, "model.kwargs.dynamic_img_size=true", "objective.local_crops=2",
             "objective.local_size=16", "objective.out_dim=64", "objective.hidden_dim=32",
             "objective.bottleneck_dim=16", "train.clip_grad=3.0", "train.clip_mode=per_param"],
    "moby": ["objective.name=moby", *TINY_SWIN, "objective.hidden_dim=32", "objective.proj_dim=16",
             "objective.queue_size=8", "train.clip_grad=5.0"],
    "simmim": ["objective.name=simmim", *TINY_SWIN, "objective.mask_patch_size=8", "train.clip_grad=5.0"],
    "dinov2": ["objective.name=dinov2", *TINY_VIT, "model.kwargs.dynamic_img_size=true", "objective.local_crops=2",
               "objective.local_size=16", "objective.out_dim=64", "objective.ibot_out_dim=64",
               "objective.hidden_dim=32", "objective.bottleneck_dim=16", "objective.centering=sinkhorn_knopp",
               "objective.freeze_last_layer_steps=0", "objective.freeze_last_layer_by=zero_lr",
               "objective.patch_embed_lr_mult=0.2", "optim.weight_decay_end=0.2", "train.clip_grad=3.0"],
}


@pytest.mark.parametrize("kind", list(TINY))
def test_each_bare_step_trains_every_parameter_it_should(kind):
    torch.set_num_threads(1)
    cfg = load_config(None, [*TINY[kind], "data.synthetic=true", "data.image_size=32", "data.batch_size=2",
                             "train.steps=2", "optim.lr=1e-3"])
    loop = bare_steps.BARE_STEPS[kind](cfg, DistEnv())
    before = {name: p.detach().clone() for name, p in loop.trained.items()}
    losses = loop(lambda: None)
    assert len(losses) == 2 and all(math.isfinite(loss.item()) for loss in losses), losses
    unchanged = {name for name, p in loop.trained.items() if torch.equal(p, before[name])}
    expected = set()
    if kind == "dino":  # the prototypes are frozen in the first epoch (utils.cancel_gradients_last_layer)
        expected = {name for name in loop.trained if "last_layer" in name}
    if kind == "moby":  # the biases of the layers before a batch norm, which subtracts them: no gradient, no decay
        expected = {"projector.0.bias", "predictor.0.bias", "projector.3.bias"}  # projector.3 feeds predictor.0
    assert unchanged == expected


# -- the official losses against vitscale's ------------------------------------------------------------------
def test_moby_contrastive_loss_is_vitscales():
    q, k = (torch.nn.functional.normalize(torch.randn(4, 8), dim=1) for _ in range(2))
    queue = torch.nn.functional.normalize(torch.randn(8, 16), dim=0)
    assert torch.allclose(bare_steps.moby_contrastive_loss(q, k, queue, 0.2),
                          moby.contrastive_loss(q, k, queue, 0.2))


def test_dinov2_losses_are_vitscales():
    torch.manual_seed(0)
    b, k, local_crops = 3, 32, 2
    logits = torch.randn(2 * b, k)
    teacher_p = dinov2.sinkhorn_knopp(logits, 0.05, DistEnv())
    assert torch.allclose(bare_steps.sinkhorn_knopp_teacher(logits, 0.05, 2 * b), teacher_p, atol=1e-6)

    student = torch.randn((2 + local_crops) * b, k)
    swapped = torch.cat(teacher_p.chunk(2)[::-1]).view(2, b, k)  # as SSLMetaArch swaps the teacher's crops
    assert torch.allclose(bare_steps.dinov2_class_loss(student, swapped, local_crops, 0.1),
                          dino.dino_cross_entropy(student, teacher_p, 0.1))

    masks = torch.rand(2 * b, 9) < 0.4
    masks[0, 0] = True
    patches = int(masks.sum())
    student_patches, patch_p = torch.randn(patches, k), torch.softmax(torch.randn(patches, k), dim=-1)
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    # vitscale's rows are padded to a fixed count (weight 0), as DINOv2's heads run on its upper bound.
    _, row_weights = dinov2.masked_patch_rows(masks, patches + 3)
    padded = [torch.cat([rows, torch.softmax(torch.randn(3, k), dim=-1)]) for rows in (student_patches, patch_p)]
    assert torch.allclose(bare_steps.ibot_masked_loss(student_patches, patch_p, weights, len(masks), 0.1),
                          dinov2.ibot_loss(*padded, row_weights, len(masks), 0.1))

    features = torch.randn(5, 16)
    assert torch.allclose(bare_steps.koleo(features), dinov2.koleo_loss(features))


# -- the report -------------------------------------------------------------------------------------------------
def _row(bare_ops: float, ours_ops: float) -> dict:
    loop = lambda ops: {"ops": ops, "kernels": ops / 2, "copy_bytes": 0.0, "syncs": {}, "dynamo": {}}  # noqa: E731
    return {"bare": loop(bare_ops), "vitscale": loop(ours_ops)}


def test_the_last_line_gives_the_worst_supervised_row_after_the_worst_self_supervised_one(capsys):
    report({"zero0": _row(100, 110), "zero2": _row(100, 130), "zero3": _row(100, 400),  # ZeRO-3 is not in it
            "dino": _row(100, 150), "dinov2": _row(200, 260)}, nproc=2)
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-2].startswith("ssl 1.500 (the worst self-supervised"), lines
    assert lines[-1].startswith("ratio 1.300 (the worst supervised"), lines


def test_without_supervised_rows_the_self_supervised_ratio_is_the_last_line(capsys):
    report({"moby": _row(100, 120)}, nproc=2)
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert [line for line in lines if line.startswith("ratio ")] == lines[-1:]
    assert lines[-1].startswith("ratio 1.200 (the worst self-supervised"), lines
