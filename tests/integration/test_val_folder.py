"""An ImageNet-style dataset (a train/ and a val/ folder of class folders) written as two shard
directories, used as written by a pre-training run and by `finetune linear`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.config import load_config
from pretrain.data import write
from pretrain.data.shards import ShardError
from pretrain.plan import resolve_sources
from tests.conftest import QUIET, TINY_VIT, run_module

PER_CLASS = {"train": 20, "val": 6}


def image_folders(root: Path, classes: range = range(10)) -> Path:
    """root/train/<digit>/*.png and root/val/<digit>/*.png from scikit-learn's digits, disjoint."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in classes:
        images = digits.images[digits.target == digit]
        start = 0
        for split, count in PER_CLASS.items():
            folder = root / split / f"digit{digit}"
            folder.mkdir(parents=True)
            for i, pixels in enumerate(images[start:start + count]):
                Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((16, 16)).save(folder / f"{i}.png")
            start += count
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imagenet_style")
    src = image_folders(root / "src")
    out = {name: root / name for name in ("train", "val", "val_as_train")}
    options = ["--per-shard", "50", "--workers", "1", "--no-progress"]
    assert write.main([str(src / "train"), str(out["train"]), *options]) == 0
    assert write.main([str(src / "val"), str(out["val"]), "--split", "val", *options]) == 0
    assert write.main([str(src / "val"), str(out["val_as_train"]), *options]) == 0  # without --split
    return out


def test_write_names_the_split(shards):
    index = json.loads((shards["val"] / "index.json").read_text())
    assert list(index["splits"]) == ["val"] and index["splits"]["val"]["samples"] == 10 * PER_CLASS["val"]
    assert sorted(p.name for p in shards["val"].glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]
    assert index["classes"] == json.loads((shards["train"] / "index.json").read_text())["classes"]
    with pytest.raises(SystemExit):
        write.main([str(shards["val"]), str(shards["val"].parent / "x"), "--split", "val", "--val-fraction", "0.1"])


def sources(train: Path, val: Path):
    return resolve_sources(load_config(None, [f"data.train={train}", f"data.val={val}", "train.steps=1"]))


def test_a_val_set_with_other_classes_or_the_train_shards_is_refused(shards, tmp_path):
    src = image_folders(tmp_path / "src", classes=range(9))  # one class missing: other class numbers
    assert write.main([str(src / "val"), str(tmp_path / "val9"), "--split", "val", "--workers", "1",
                       "--no-progress"]) == 0
    with pytest.raises(ShardError, match=r"data.val=.*numbers its 9 classes differently .*10 classes"):
        sources(shards["train"], tmp_path / "val9")
    with pytest.raises(ShardError, match="reads the very shards of data.train"):
        sources(shards["train"], shards["train"])
    _, val = sources(shards["train"], shards["val_as_train"])
    assert val.samples == 10 * PER_CLASS["val"] and all("/val_as_train/train-" in u for u in val.urls)


def test_a_run_and_the_linear_probe_use_the_val_folder(shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_module("pretrain", "configs/pretrain/digits_supervised.yaml", f"run.dir={run_dir}",
                        f"data.train={shards['train']}", f"data.val={shards['val']}", "data.prepare=none", *QUIET,
                        *TINY_VIT, "train.epochs=null", "train.steps=3", "train.eval_every=0", "train.ckpt_every=0",
                        "data.batch_size=16", "data.shuffle_buffer=10")
    # Said once, in vitscale's words; none of DeepSpeed's own guessing about accelerators.
    assert result.stderr.count("1 process on the CPU (no GPU found; DeepSpeed's CPU accelerator), gloo backend") == 1
    assert "Setting accelerator" not in result.stdout + result.stderr and "ds_accelerator" not in result.stdout
    final = json.loads((run_dir / "run.json").read_text())["final"]
    assert 0.0 <= final["val/top1"] <= 100.0
    probe_dir = tmp_path / "probe"
    result = run_module("finetune", "linear", "configs/finetune/linear_demo.yaml", f"pretrained={run_dir}",
                        f"run.dir={probe_dir}", f"data.train={shards['train']}", f"data.val={shards['val_as_train']}",
                        "data.prepare=none", "data.workers=0", "run.threads=1", "linear.epochs=1",
                        "linear.lrs=[0.1]", "features.blocks=[2]", "features.avgpool=[false]")
    assert f"{shards['val_as_train']} has one split, 'train': reading it as the val set" in result.stderr
    report = json.loads((probe_dir / "linear.json").read_text())
    assert report["val_samples"] == 10 * PER_CLASS["val"]
