"""DINO: the loss against the paper's formula, centering, schedules, config checks, one forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import TINY_VIT
from tests.helpers import TINY_DINO, tiny_config, tiny_objective
from pretrain.config import ConfigError, load_config
from pretrain.objectives.dino import dino_loss


def paper_dino_loss(student, teacher, center, tau_s, tau_t, n_global):
    """Caron et al. 2021, Algorithm 1 and eq. (3), with explicit loops in float64:
    sum over teacher crops t and student crops s != t of H(P_t, P_s), averaged over images and pairs."""
    student, teacher, center = (np.asarray(a, dtype=np.float64) for a in (student, teacher, center))
    batch = teacher.shape[0] // n_global
    crops = student.shape[0] // batch
    total, pairs = 0.0, 0
    for t in range(n_global):
        for s in range(crops):
            if s == t:
                continue
            for b in range(batch):
                logits_t = (teacher[t * batch + b] - center[0]) / tau_t
                p_t = np.exp(logits_t - logits_t.max())
                p_t /= p_t.sum()
                logits_s = student[s * batch + b] / tau_s
                log_p_s = logits_s - logits_s.max() - math.log(np.exp(logits_s - logits_s.max()).sum())
                total += -(p_t * log_p_s).sum() / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("local_crops", [0, 3])
def test_loss_matches_the_paper(local_crops):
    g = torch.Generator().manual_seed(local_crops)
    batch, dim = 5, 7
    student = torch.randn((2 + local_crops) * batch, dim, generator=g) * 3
    teacher = torch.randn(2 * batch, dim, generator=g) * 3
    center = torch.randn(1, dim, generator=g)
    loss, probs = dino_loss(student, teacher, center, 0.1, 0.04)
    expected = paper_dino_loss(student, teacher, center, 0.1, 0.04, 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2 * batch))


def test_local_crops_of_another_size_need_dynamic_img_size(tmp_path):
    with pytest.raises(ConfigError, match="model.kwargs.dynamic_img_size"):
        load_config(None, [*TINY_VIT, "objective.name=dino", "data.synthetic=true", "train.steps=1",
                           "data.image_size=32", "objective.local_size=16"])
    with pytest.raises(ConfigError, match="objective.blur\\[2\\]"):
        tiny_config(tmp_path, *TINY_DINO, "objective.blur=[1.0, 0.1, 1.5]")


def test_forward_centre_and_schedules(tmp_path):
    cfg = tiny_config(tmp_path, *TINY_DINO, "objective.teacher_temp_warmup_epochs=1",
                      "objective.freeze_last_layer_epochs=1")
    torch.manual_seed(0)
    objective = tiny_objective(cfg)
    batch = {"global": torch.randint(0, 256, (4, 2, 3, 32, 32), dtype=torch.uint8),
             "local": torch.randint(0, 256, (4, 2, 3, 16, 16), dtype=torch.uint8)}
    loss, metrics = objective(batch, step=0)
    assert torch.isfinite(loss)
    assert {"teacher_entropy", "teacher_batch_entropy", "kl", "embedding_std", "center_norm"} <= set(metrics)
    # The centre moved by (1 - m) of the teacher's batch mean, from zero.
    with torch.no_grad():
        teacher_out = objective.teacher("head", objective.teacher("backbone", torch.zeros(1, 3, 32, 32)))
    assert objective.center.shape == teacher_out.shape and objective.center.abs().sum() > 0
    loss.backward()
    # During the first epoch no gradient reaches the prototypes; the rest of the head learns.
    assert objective.student["head"].last_layer.weight_v.grad is None
    assert objective.student["head"].mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.teacher.parameters())
    objective.zero_grad()
    objective(batch, step=4)[0].backward()
    assert objective.student["head"].last_layer.weight_v.grad.abs().sum() > 0
    # Teacher temperature: linear warm-up over an epoch (4 steps), then constant; momentum cosine to 1.
    assert [objective.teacher_temp(s) for s in (0, 2, 4, 9)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert objective.momentum(0) == pytest.approx(0.996) and objective.momentum(10) == pytest.approx(1.0)


def test_crops_enter_in_the_run_contexts_compute_dtype(tmp_path):
    """The run context, not a module's weights, says what the backbone computes in: under bf16 the
    engine casts the objective after it is built."""
    crops = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        objective = tiny_objective(tiny_config(tmp_path, *TINY_DINO, f"engine.precision={precision}"))
        assert objective.ctx.compute_dtype == dtype
        assert objective._inputs(crops, objective.photometric[0]).dtype == dtype


def test_export_choice(tmp_path):
    teacher = tiny_objective(tiny_config(tmp_path, *TINY_DINO))
    student = tiny_objective(tiny_config(tmp_path, *TINY_DINO, "objective.export=student"))
    assert teacher.backbone() is teacher.teacher.nets["backbone"]
    assert student.backbone() is student.student["backbone"]
    assert teacher.backbone_prefix() == "teacher.nets.backbone."


def test_prototypes_are_frozen_like_parameters_without_gradients(tmp_path):
    """During the first epoch the optimizer leaves the last layer alone entirely (as torch does with
    parameters whose gradient is None): no update, no weight decay, no Adam state. Afterwards its
    Adam state starts fresh, so its first update is lr-sized."""
    from types import SimpleNamespace

    from pretrain.engine import Engine, SkippableAdamW

    cfg = tiny_config(tmp_path, *TINY_DINO, "objective.freeze_last_layer_epochs=1", "objective.norm_last_layer=false")
    objective = tiny_objective(cfg)
    groups = objective.param_groups()
    last = {id(p) for p in objective.student["head"].last_layer.parameters()}
    frozen = [g for g in groups if g.get("freeze_steps")]
    assert {id(p) for g in frozen for p in g["params"]} == last and all(g["freeze_steps"] == 4 for g in frozen)
    assert all(id(p) not in last for g in groups if not g.get("freeze_steps") for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in objective.parameters())

    optimizer = SkippableAdamW(groups, lr=0.0, weight_decay=0.04)
    engine = SimpleNamespace(optimizer=optimizer)
    for g in optimizer.param_groups:
        g.setdefault("lr_scale", 1.0)
    prototypes = objective.student["head"].last_layer.weight_v
    before = prototypes.detach().clone()
    for step in range(5):
        Engine.set_hyperparameters(engine, 1e-2, 0.04, step)
        for p in objective.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None  # ZeRO's zeros would decay too
        optimizer.step()
        if step < 4:
            assert torch.equal(prototypes, before) and prototypes not in optimizer.state, step
    assert optimizer.state[prototypes]["step"] == 1
    # Fresh Adam, decoupled decay: w <- w (1 - lr wd) - lr * g / (|g| + eps), g = 1.
    assert torch.allclose(prototypes, before * (1 - 1e-2 * 0.04) - 1e-2, atol=1e-6)
