"""Full fine-tuning: supervised training from pre-trained weights, through pre-training's own trainer.

What differs from supervised pre-training is all in the objective built here: the backbone starts
from the pre-trained weights (adapted to the new resolution and window, with a new or mapped
head), the parameter groups carry layer-wise lr scales (timm's ``group_matcher``; the engine
multiplies each group's lr by its ``lr_scale``), and an optional EMA of the weights is kept and
evaluated beside them. The trainer subclass only keeps the best validation checkpoint's export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

from finetune import weights
from finetune.config import FullConfig
from pretrain.dist import DistEnv
from pretrain.objectives import base, supervised
from pretrain.trainer import Trainer

log = logging.getLogger(__name__)


class FinetuneObjective(supervised.Objective):
    def __init__(self, cfg: FullConfig, ctx: base.RunContext) -> None:
        super().__init__(cfg, ctx)
        f = cfg.finetune
        if cfg.pretrained is not None:
            found = weights.load_into(self.model, cfg.pretrained, f.checkpoint_key, f.head, f.class_map,
                                      f.relpos_interpolation)
            if ctx.dist.is_main:
                log.info("fine-tuning from %s (%s)", found.source, found.layout)
        if f.head == "new" and f.head_init_scale != 1.0:
            with torch.no_grad():
                for param in self.model.get_classifier().parameters():
                    param.mul_(f.head_init_scale)
        # The EMA is a submodule, so it is saved and resumed with the rest of the objective.
        self.ema = ModelEmaV3(self.model, decay=f.ema) if f.ema else None

    def param_groups(self) -> list[dict]:
        layer_decay = self.cfg.finetune.layer_decay
        if layer_decay is None:
            return super().param_groups()
        # optim.no_decay's names inside the model; timm's grouping also always exempts 1-D parameters.
        prefix = self.backbone_prefix()
        exempt = {n[len(prefix):] for n in self.no_decay_names() if n.startswith(prefix)}
        groups = param_groups_layer_decay(self.model, weight_decay=self.cfg.optim.weight_decay,
                                          no_weight_decay_list=exempt,
                                          layer_decay=layer_decay)
        for group in groups:  # the engine schedules weight decay only where it applies
            group["apply_weight_decay"] = group["weight_decay"] > 0
        return groups

    def after_step(self, step: int, engine) -> None:
        # timm's EMA takes its weight as a number: whether the step was applied is read on the host.
        if self.ema is not None and bool(engine.applied()):
            self.ema.update(self.model, step=step)

    @torch.no_grad()
    def val_step(self, batch: dict) -> dict[str, torch.Tensor]:
        out = super().val_step(batch)
        if self.ema is not None:
            model = self.model
            self.model = self.ema.module  # the same measurement on the averaged weights
            try:
                ema = super().val_step(batch)
            finally:
                self.model = model
            out.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
        return out


class FinetuneTrainer(Trainer):
    """The trainer, keeping an export of the weights with the best ``val/top1`` in ``RUN_DIR/best``."""

    build_partitioned = False  # the objective loads the pre-trained weights into the whole model as it is built

    def __init__(self, cfg: FullConfig, dist: DistEnv) -> None:
        super().__init__(cfg, dist, make_objective=FinetuneObjective)
        self.best_dir = self.run_dir / "best"
        meta = self.best_dir / "backbone.json"
        self.best_top1 = json.loads(meta.read_text())["val/top1"] if meta.is_file() else float("-inf")

    def evaluate(self) -> dict[str, float]:
        result = super().evaluate()
        top1 = result.get("val/top1")
        if self.cfg.finetune.keep_best and top1 is not None and top1 > self.best_top1:
            self.best_top1 = top1
            self.export(self.best_dir, {"val/top1": top1, "pretrained": self.cfg.pretrained})
        return result


def run(cfg: FullConfig, dist: DistEnv, random_init: bool = False) -> dict:
    """Fine-tune; the final validation metrics, and under ``state`` how the run ended (Trainer.state:
    ``stopped`` makes the process exit STOPPED_EXIT_CODE). ``random_init``: the same recipe and model
    without the pre-trained weights."""
    if random_init:
        cfg = dataclasses.replace(cfg, pretrained=None)
    trainer = FinetuneTrainer(cfg, dist)
    trainer.stop_on_signal()
    result = trainer.fit()
    if dist.is_main:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        print(f"fine-tuned: {shown}\n  run dir: {cfg.run.dir}\n  best: {trainer.best_dir} "
              f"(val/top1 {trainer.best_top1:.4f})\n  export: {Path(cfg.run.dir) / 'export'}")
    return {**result, "state": trainer.state}
