"""Each published checkpoint layout is recognized; weights that do not fit fail naming the keys."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune import weights
from finetune.weights import WeightsError
from pretrain.config import ModelConfig

VIT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "img_size": 32}
SWIN = {"patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "img_size": 32, "window_size": 4}


def vit(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **VIT)


def swin(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=num_classes, **SWIN)


def assert_same_backbone(model, reference, head: bool = False):
    prefix = weights.classifier_prefix(model)
    for key, value in reference.state_dict().items():
        if head or not key.startswith(prefix):
            assert torch.equal(model.state_dict()[key], value), key


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def test_timm_state_dict_and_safetensors(tmp_path):
    source = vit(seed=1)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    for name in ("vit.pth", "vit.safetensors"):
        model = vit()
        found = weights.load_into(model, tmp_path / name, head="keep")
        assert found.layout == "no prefix"
        assert_same_backbone(model, source, head=True)


def test_dino_teacher_preferred_and_student_on_request(tmp_path):
    teacher, student = vit(seed=1), vit(seed=2)
    dino_head = {"head.mlp.0.weight": torch.zeros(64, 32), "head.last_layer.weight_g": torch.ones(1, 1)}
    torch.save({"teacher": {**prefixed(teacher.state_dict(), "backbone."), **dino_head},
                "student": {**prefixed(student.state_dict(), "module.backbone."), **prefixed(dino_head, "module.")},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, tmp_path / "dino.pth")
    model = vit()
    assert weights.load_into(model, tmp_path / "dino.pth").layout == "prefix 'backbone.'"
    assert_same_backbone(model, teacher)
    model = vit()
    found = weights.load_into(model, tmp_path / "dino.pth", checkpoint_key="student")
    assert found.layout == "prefix 'module.backbone.'"
    assert_same_backbone(model, student)
    with pytest.raises(WeightsError, match="no entry 'ema'"):
        weights.load_into(vit(), tmp_path / "dino.pth", checkpoint_key="ema")


def test_moby_online_encoder_not_the_momentum_one(tmp_path):
    online, momentum = swin(seed=1), swin(seed=2)
    state = {**prefixed(online.state_dict(), "encoder."), **prefixed(momentum.state_dict(), "encoder_k."),
             "projector.linear1.weight": torch.zeros(8, 32), "queue1": torch.zeros(8, 16), "queue_ptr": torch.zeros(1)}
    torch.save({"model": prefixed(state, "module.")}, tmp_path / "moby.pth")
    model = swin()
    assert weights.load_into(model, tmp_path / "moby.pth").layout == "prefix 'module.encoder.'"
    assert_same_backbone(model, online)


def official_swin_layout(model: torch.nn.Module) -> dict:
    """A timm Swin's weights as Microsoft's Swin repository saves them: down-sampling at the end of a
    stage instead of the start of the next, ``head.`` for ``head.fc.``, and the buffers kept."""
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        state[key.replace("head.fc.", "head.")] = value
    for name, buffer in model.named_buffers():
        if name.endswith(("relative_position_index", "attn_mask")):
            state[name] = buffer
    return state


def test_official_swin_with_22k_head_mapped_to_classes(tmp_path):
    source = swin(num_classes=30, seed=1)  # the "22K" head
    state = official_swin_layout(source)
    assert "layers.0.downsample.reduction.weight" in state and "head.weight" in state
    assert any(k.endswith("relative_position_index") for k in state)
    torch.save({"model": state, "optimizer": {}, "epoch": 90}, tmp_path / "swin_22k.pth")
    rows = [29, 3, 17, 0, 5, 8, 11, 13, 21, 2]
    (tmp_path / "map.txt").write_text("# 22k index of each class\n" + "\n".join(map(str, rows)) + "\n")
    model = swin(num_classes=10)
    weights.load_into(model, tmp_path / "swin_22k.pth", head="map", class_map=str(tmp_path / "map.txt"))
    assert_same_backbone(model, source)
    assert torch.equal(model.head.fc.weight, source.head.fc.weight[rows])
    assert torch.equal(model.head.fc.bias, source.head.fc.bias[rows])
    fresh = swin(num_classes=10)
    weights.load_into(fresh, tmp_path / "swin_22k.pth", head="new")  # a new head: the 22K one is left out
    assert torch.equal(fresh.head.fc.weight, swin(num_classes=10).head.fc.weight)


def test_vitscale_objective_and_ddp_prefixes(tmp_path):
    source = vit(seed=3)
    torch.save(prefixed(source.state_dict(), "model."), tmp_path / "objective.pth")
    torch.save({"state_dict": prefixed(source.state_dict(), "module.")}, tmp_path / "ddp.pth")
    for name, layout in (("objective.pth", "prefix 'model.'"), ("ddp.pth", "prefix 'module.'")):
        model = vit()
        assert weights.load_into(model, tmp_path / name).layout == layout
        assert_same_backbone(model, source)


def test_vitscale_export_describes_its_model(tmp_path):
    source = vit(seed=4)
    (tmp_path / "export").mkdir()
    save_file(source.state_dict(), str(tmp_path / "export" / "backbone.safetensors"))
    (tmp_path / "export" / "backbone.json").write_text(json.dumps(
        {"model": "vit_tiny_patch16_224", "kwargs": {**VIT, "num_classes": 10, "drop_path_rate": 0.1}}))
    resolved = weights.resolve_model(ModelConfig(name="vit_small_patch16_224", kwargs={"depth": 2}), tmp_path)
    assert resolved.name == "vit_tiny_patch16_224"
    assert resolved.kwargs == {k: v for k, v in VIT.items() if k != "img_size"}  # recipe kwargs win
    model = vit()
    weights.load_into(model, tmp_path)  # the run dir: its export is found
    assert_same_backbone(model, source)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    state = vit().state_dict()
    state.pop("blocks.1.mlp.fc2.weight")
    state["blocks.2.norm1.weight"] = torch.ones(32)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"1 missing keys: blocks\.1\.mlp\.fc2\.weight.*"
                                           r"1 unexpected keys: blocks\.2\.norm1\.weight"):
        weights.load_into(vit(), tmp_path / "bad.pth")
    torch.save(vit(num_classes=7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(WeightsError, match=r"head\.weight: stored \(7, 32\), model \(10, 32\)"):
        weights.load_into(vit(), tmp_path / "seven.pth", head="keep")
    with pytest.raises(WeightsError, match="no such file"):
        weights.load_into(vit(), tmp_path / "absent.pth")


class Payload:
    """Any class: unpickling it could run code, so a weights-only load refuses it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": vit().state_dict(), "args": Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match="weights-only"):
        weights.load_into(vit(), tmp_path / "pickled.pth")


@pytest.mark.parametrize("name", ["export/backbone.safetensors", "vit.safetensors", "vit.pth"])
def test_truncated_weights_fail_naming_the_file_and_leave_the_model_untouched(tmp_path, name):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    state = vit(seed=5).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    model, reference = vit(), vit()
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        weights.load_into(model, tmp_path if name.startswith("export/") else path)
    assert_same_backbone(model, reference, head=True)
