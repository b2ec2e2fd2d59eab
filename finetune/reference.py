"""Where a stage's number stands: the same recipe on the same model at random initialization, and
a logistic regression on the raw pixels, printed beside the result (``reference: true``).

A probe or fine-tuning result alone does not say whether pre-training helped: digits give a linear
classifier on raw pixels about 96%, and a random tiny ViT's features about 50%.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.dist import DistEnv

STAGE_MODULES = {"full": "finetune.full", "linear": "finetune.linear", "knn": "finetune.knn"}


def top1(stage: str, result: dict) -> float:
    """A stage's headline top-1 in percent: the best probe head, or fine-tuning's last validation."""
    if stage == "full":
        return 100.0 * result["val/top1"]
    return result["best_top1"]


def run_with_reference(stage: str, cfg, dist: DistEnv) -> dict:
    """Run ``stage``; with ``cfg.reference``, run it again from random init (into ``RUN_DIR/random-init``)
    and fit raw pixels, and print the three top-1s. Returns the stage's own result, plus
    ``reference`` ({"random_init": top-1, "raw_pixels": top-1}) when computed."""
    module = importlib.import_module(STAGE_MODULES[stage])
    result = module.run(cfg, dist)
    if not cfg.reference or result.get("state") == "stopped":  # a fine-tuning stopped on a signal
        return result
    reference_dir = Path(cfg.run.dir) / "random-init"
    reference_cfg = dataclasses.replace(cfg, reference=False, run=dataclasses.replace(cfg.run, dir=str(reference_dir)))
    if hasattr(cfg, "features"):  # a probe's own feature cache holds the pre-trained model's features
        reference_cfg.features = dataclasses.replace(cfg.features, cache=None)
    baseline = module.run(reference_cfg, dist, random_init=True)
    if baseline.get("state") == "stopped":
        return {**result, "state": "stopped"}
    result["reference"] = {"random_init": top1(stage, baseline)}
    if dist.is_main:
        from pretrain.probe import raw_pixel_accuracy

        d = cfg.data
        result["reference"]["raw_pixels"] = 100.0 * raw_pixel_accuracy(d.train, d.image_size, d.val)
        name = {"full": "full fine-tuning", "linear": "linear probe", "knn": "kNN"}[stage]
        print(f"{name}, top-1 on the validation split:\n"
              f"  pre-trained  {top1(stage, result):5.1f}%  ({cfg.pretrained})\n"
              f"  random init  {result['reference']['random_init']:5.1f}%  (the same recipe and model; {reference_dir})\n"
              f"  raw pixels   {result['reference']['raw_pixels']:5.1f}%  (logistic regression on the "
              f"{d.image_size}x{d.image_size} images, no backbone)")
    return result
