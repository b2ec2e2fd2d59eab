"""JPEG decoding on the device (run here on the CPU: the same code, torchvision's libjpeg decoder):
the same crops as the workers' path, bad files counted, and batches prefetched without losing the
stream's position."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from pretrain.bench.data import imagenet_like_jpegs, write_shards
from pretrain.config import ConfigError, load_config
from pretrain.data.decode import EncodedImage
from pretrain.data.device_decode import DEFERRED, DeferredViews, DeviceDecodedView, assemble, collate
from pretrain.data.prefetch import DeviceBatches
from pretrain.data.stream import Loader, ShardDataset
from pretrain.data.transforms import SupervisedTrainView
from pretrain.data.views import MultiCropView, TwoView
from tests.unit.data_samples import image_bytes, write_bad_shards

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return imagenet_like_jpegs(6, seed=1)


def supervised_view(size=64):
    return SupervisedTrainView(size, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, None, 0.0, "bicubic", (0.5, 0.5, 0.5))


def both_paths(view, images: list[bytes]) -> tuple[dict, dict]:
    """(the workers' batch, the device's batch) of ``images`` with the same random draws."""
    wrapped = DeviceDecodedView(view)
    cpu_items, device_items = [], []
    for i, data in enumerate(images):
        random.seed(i)
        image = EncodedImage.open(data)
        cpu_items.append({**view(image if getattr(view, "decodes_itself", False) else _pil(data)), "label": i})
        random.seed(i)
        device_items.append({**wrapped(EncodedImage.open(data)), "label": i})
    keys = [str(i) for i in range(len(images))]
    batch, failed = assemble(collate(device_items, keys), CPU)
    assert failed == []
    return collate(cpu_items, keys), batch


def _pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize("make_view", [supervised_view, lambda: MultiCropView(48, (0.4, 1.0), 24, (0.05, 0.4), 3),
                                       lambda: TwoView(40, (0.2, 1.0))], ids=["supervised", "multicrop", "two_view"])
def test_device_decoding_gives_the_workers_crops(jpegs, make_view):
    cpu, device = both_paths(make_view(), jpegs)
    assert DEFERRED not in device
    assert cpu.keys() == device.keys()
    for key in cpu:
        assert cpu[key].shape == device[key].shape and device[key].dtype == cpu[key].dtype, key
        if key == "label":
            assert torch.equal(cpu[key], device[key])
            continue
        # Same boxes and flips; only the decoders (reduced DCT vs full) and resamplers differ.
        diff = (cpu[key].float() - device[key].float()).abs()
        assert diff.mean() < 4.0, (key, diff.mean())
        # A wrong box or flip would differ by tens of levels.
        per_crop = diff.flatten(0, -4).mean(dim=(-3, -2, -1)) if diff.ndim > 4 else diff.mean(dim=(1, 2, 3))
        assert per_crop.max() < 8.0, (key, per_crop)


def test_a_batch_carries_pixels_for_what_the_device_cannot_decode(jpegs):
    """PNG and CMYK JPEGs are decoded by the worker; their pixels sit in the batch next to the device's."""
    png = image_bytes(_pil(jpegs[0]), "PNG")
    cmyk = image_bytes(_pil(jpegs[1]).convert("CMYK"))
    gray = image_bytes(_pil(jpegs[2]).convert("L"))
    assert not EncodedImage.open(png).device_decodable and not EncodedImage.open(cmyk).device_decodable
    assert EncodedImage.open(gray).device_decodable
    images = [jpegs[3], png, cmyk, gray]
    cpu, device = both_paths(supervised_view(), images)
    wrapped = DeviceDecodedView(supervised_view())
    assert [DEFERRED in wrapped(EncodedImage.open(d)) for d in images] == [True, False, False, True]
    for i in (1, 2):  # decoded by the worker: the very same pixels
        assert torch.equal(cpu["image"][i], device["image"][i])
    assert (cpu["image"].float() - device["image"].float()).abs().mean() < 4.0


def test_bad_jpegs_are_counted_and_their_slots_refilled(tmp_path):
    """The bad-data shards through both paths: the same skip counts; the device path keeps every
    batch full, a failed slot holding a copy of another sample (pixels and label)."""
    shards = write_bad_shards(tmp_path)

    def run(view, device_decode):
        dataset = ShardDataset(shards["urls"], view, 4, rank=0, world_size=1, seed=0, train=False)
        loader = Loader(dataset, workers=0)
        if not device_decode:
            return list(loader), loader.skipped
        batches = DeviceBatches(loader, CPU)
        return list(batches), batches.skipped

    plain, plain_skips = run(supervised_view(16), False)
    device, device_skips = run(DeviceDecodedView(supervised_view(16)), True)
    assert device_skips == plain_skips == Counter(shards["skips"])
    assert sum(len(b["label"]) for b in plain) == len(shards["good"])
    # The truncated JPEG passes the worker (its header is fine) and fails on the device: one slot refilled.
    assert sum(len(b["label"]) for b in device) == len(shards["good"]) + 1
    for batch in device:
        assert batch["image"].shape[1:] == (3, 16, 16) and len(batch["image"]) == len(batch["label"])
        assert not any(k.startswith("__") for k in batch)
    refilled = [b for b in device if len({tuple(x.flatten().tolist()) for x in b["image"]}) < len(b["image"])]
    assert len(refilled) == 1


def test_a_batch_with_nothing_decodable_is_dropped():
    broken = b"\xff\xd8\xff\xe0" + bytes(100)
    view = supervised_view(8)
    random.seed(0)
    plan = view.plan((40, 30))
    batch = collate([{DEFERRED: DeferredViews(broken, plan), "label": 3}], ["k0"])
    assert assemble(batch, CPU) == (None, ["k0"])


@pytest.mark.parametrize("background", [False, True], ids=["inline", "thread"])
def test_prefetched_batches_and_positions_match_the_loader(tmp_path, jpegs, background):
    urls = write_shards(jpegs * 3, tmp_path, per_shard=6)

    def loader():
        view = DeviceDecodedView(supervised_view(16))
        return Loader(ShardDataset(urls, view, 3, rank=0, world_size=1, seed=0, train=True, shuffle_buffer=4),
                      workers=1)

    reference = loader()
    expected, states = [], []
    for batch in DeviceBatches(reference, CPU, background=False):
        expected.append(batch)
        states.append(reference.state_dict())
        if len(expected) == 5:
            break
    batches = DeviceBatches(loader(), CPU, background=background)
    try:
        for want, state in zip(expected, states):
            got = next(batches)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
            assert batches.state_dict() == state  # the position of the batch handed out, not of the lookahead
    finally:
        batches.close()


def test_decode_on_device_refuses_workers_photometric_augmentation(tmp_path):
    with pytest.raises(ConfigError, match="data.decode_on_device"):
        load_config(None, ["data.synthetic=true", "train.steps=1", "data.decode_on_device=true"])
    load_config(None, ["data.synthetic=true", "train.steps=1", "data.decode_on_device=true",
                       "objective.auto_augment=null", "objective.color_jitter=0"])
    view = SupervisedTrainView(16, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, "rand-m9-mstd0.5", 0.4, "bicubic", (0.5,) * 3)
    with pytest.raises(ConfigError, match="data.decode_on_device"):
        DeviceDecodedView(view)
