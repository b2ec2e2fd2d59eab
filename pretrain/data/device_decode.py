"""JPEG decoding on the device: workers plan the crops, the accelerator decodes and cuts them.

With ``data.decode_on_device``, a worker no longer decodes a baseline JPEG. It reads the header
(size, colour space), draws the view's random crops, flips and interpolation exactly as the CPU
view would, and hands over the raw bytes with that plan (:class:`DeferredViews`). On the device,
:func:`assemble` decodes the batch's JPEGs in one ``torchvision.io.decode_jpeg`` call (nvJPEG,
batched, on CUDA; libjpeg-turbo on CPU) and cuts, resizes (antialiased) and flips each crop into
the uint8 tensors the objective expects, so the objective cannot tell the two paths apart.

Anything nvJPEG may not take (PNG, CMYK and other colour spaces, files the header reader refuses)
is decoded by the worker as before: a batch carries pixels for some samples and bytes for others.
A JPEG that fails on the device is counted as ``undecodable`` and its slot in the batch is filled
with a copy of another sample (image and label), so the batch keeps its shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data._utils.collate import default_collate

from pretrain.data.decode import EncodedImage, load_rgb
from pretrain.sections import ConfigError

DEFERRED = "__deferred__"  # the batch key that carries the samples left to the device


@dataclass(frozen=True)
class ViewPlan:
    """One view key's crops of one image: boxes (left, top, right, bottom, full-size pixels) and
    flips, all resized to ``size`` (w, h). ``stacked``: the key holds N x 3 x H x W (multi-crop)
    rather than one 3 x H x W image."""

    boxes: tuple[tuple[int, int, int, int], ...]
    flips: tuple[bool, ...]
    size: tuple[int, int]
    interpolation: str
    stacked: bool


@dataclass
class DeferredViews:
    """A sample whose pixels the device decodes: the JPEG file and its views' plans."""

    data: bytes
    views: dict[str, ViewPlan]


@dataclass
class DeferredBatch:
    """The deferred samples of one batch: their positions in it, their plans, and their files laid end
    to end in one tensor (one shared-memory block from a worker, not one per file); also where the
    worker-decoded samples sit."""

    batch_size: int
    positions: list[int]
    plans: list[dict[str, ViewPlan]]
    data: torch.Tensor  # 1-D uint8: file i is data[offsets[i]:offsets[i + 1]]
    offsets: list[int]
    keys: list[str]
    pixel_positions: list[int]

    def files(self) -> list[torch.Tensor]:
        return [self.data[a:b] for a, b in zip(self.offsets, self.offsets[1:])]


class DeviceDecodedView:
    """Wraps a view that can ``plan`` its crops: baseline JPEGs are left for the device to decode,
    everything else is decoded here by the wrapped view, as without the wrapper."""

    decodes_itself = True

    def __init__(self, view) -> None:
        if not getattr(view, "supports_device_decode", False):
            raise ConfigError(f"data.decode_on_device=true: the objective's view {type(view).__name__} cannot be "
                              f"decoded on the device (photometric augmentation on PIL images in the workers, "
                              f"e.g. RandAugment, needs the pixels there)")
        self.view = view

    def __call__(self, image) -> dict:
        if isinstance(image, EncodedImage) and image.device_decodable:
            return {DEFERRED: DeferredViews(image.data, self.view.plan(image.size))}
        if isinstance(image, EncodedImage) and not getattr(self.view, "decodes_itself", False):
            image = load_rgb(image.pil_image())
        return self.view(image)


def collate(items: list[dict], keys: list[str]) -> dict:
    """``default_collate``, except that view keys of deferred samples are left for :func:`assemble`;
    ``keys`` name the samples (for messages about the ones that fail on the device)."""
    deferred = {i: item.pop(DEFERRED) for i, item in enumerate(items) if DEFERRED in item}
    if not deferred:
        return default_collate(items)
    shared = set(items[next(iter(deferred))])  # keys every sample has (the label); the rest are views
    pixel_items = [item for i, item in enumerate(items) if i not in deferred]
    batch = default_collate([{k: item[k] for k in shared} for item in items])
    if pixel_items:
        batch.update(default_collate([{k: v for k, v in item.items() if k not in shared} for item in pixel_items]))
    positions = sorted(deferred)
    files = [deferred[i].data for i in positions]
    offsets = [0]
    for data in files:
        offsets.append(offsets[-1] + len(data))
    batch[DEFERRED] = DeferredBatch(len(items), positions, [deferred[i].views for i in positions],
                                    torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8), offsets,
                                    [keys[i] for i in positions], [i for i in range(len(items)) if i not in deferred])
    return batch


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """3 x H x W uint8 RGB images on ``device``; None for a file that fails to decode.

    On CUDA the whole list goes to nvJPEG in one batched call; one broken file fails that call, so
    the files are then decoded one by one to find it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for one in data:
                try:
                    out.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=device)[0])
                except RuntimeError:
                    out.append(None)
            return out


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int], interpolation: str,
                flip: bool) -> torch.Tensor:
    """``box`` of a 3 x H x W uint8 image, resized to ``size`` (w, h) with antialiasing, flipped."""
    left, top, right, bottom = box
    crop = image[None, :, top:bottom, left:right]
    if crop.shape[-2:] != (size[1], size[0]):
        # Antialiased resizing of uint8 exists only on the CPU; float works everywhere.
        crop = crop.float()
        reduce = int(min(crop.shape[-1] / size[0], crop.shape[-2] / size[1]) // 3)
        if reduce >= 2:
            # Shrink by an integer factor first, leaving a factor of 3 to 6 (box averaging, like
            # PIL's reducing_gap=3 in the workers' multi-crop views): CUDA's antialiased kernels
            # refuse very large factors (their weights no longer fit in shared memory), and what
            # is left costs less.
            crop = F.avg_pool2d(crop, reduce, ceil_mode=True)
        resized = F.interpolate(crop, size=(size[1], size[0]), mode=interpolation, antialias=True)
        crop = resized.round_().clamp_(0, 255).to(torch.uint8)
    crop = crop[0]
    return crop.flip(-1) if flip else crop


def assemble(batch: dict, device: torch.device) -> tuple[dict | None, list[str]]:
    """Decode a batch's deferred samples on ``device`` and put their views in place.

    ``batch``'s tensors are already on ``device``. Returns (the batch, keys of the samples that
    failed to decode); the batch is None when no sample in it could be decoded."""
    deferred: DeferredBatch | None = batch.pop(DEFERRED, None)
    if deferred is None:
        return batch, []
    images = decode_jpegs(deferred.files(), device)
    for key, first in deferred.plans[0].items():
        w, h = first.size
        shape = (len(first.boxes), 3, h, w) if first.stacked else (3, h, w)
        out = torch.empty((deferred.batch_size, *shape), dtype=torch.uint8, device=device)
        if deferred.pixel_positions:
            out[deferred.pixel_positions] = batch[key]
        for position, plans, image in zip(deferred.positions, deferred.plans, images):
            if image is None:
                continue
            plan = plans[key]
            crops = [crop_resize(image, box, plan.size, plan.interpolation, flip)
                     for box, flip in zip(plan.boxes, plan.flips)]
            out[position] = torch.stack(crops) if plan.stacked else crops[0]
        batch[key] = out
    failed = [p for p, image in zip(deferred.positions, images) if image is None]
    if not failed:
        return batch, []
    bad_keys = [k for k, image in zip(deferred.keys, images) if image is None]
    good = [p for p in range(deferred.batch_size) if p not in set(failed)]
    if not good:
        return None, bad_keys
    # Keep the batch's shape (an even batch for Mixup, static shapes for compiled models): each
    # failed slot takes a copy of a good sample.
    sources = torch.tensor([good[i % len(good)] for i in range(len(failed))], device=device)
    targets = torch.tensor(failed, device=device)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim and value.shape[0] == deferred.batch_size:
            value[targets] = value[sources]
    return batch, bad_keys
