"""DINO multi-crop views per second per core: vitscale against a plain torchvision/PIL pipeline.

    python -m pretrain.bench views [--images N] [--rounds R] [--local-crops 10]

Both make DINO's 2 x 224 global + 10 x 96 local crops from the same in-memory JPEGs (500x375,
quality 90, cut from scikit-image's sample photos), in one process with one thread (one core):

- baseline: DINO's published augmentation written with torchvision on PIL images: decode,
  RandomResizedCrop, flip, ColorJitter (p 0.8), RandomGrayscale (0.2), GaussianBlur (1.0 / 0.1 /
  0.5), RandomSolarize (second global crop, 0.2), ToTensor, Normalize;
- vitscale, worker: what a data worker does: decode (the trainer's ``decode``) and
  ``MultiCropView`` (one PIL resize per crop, box cropping, flip, uint8);
- vitscale, + photometric on this CPU: the worker plus ``Photometric`` and normalization run
  batched on this same core, for information: on a GPU that part leaves the CPU entirely.

Rounds alternate between the pipelines so that load from other processes hits them alike; each
row is the median round. The last line is the workers' speed-up over the baseline.
"""

from __future__ import annotations

import io
import statistics
import time

import torch
from PIL import Image

from pretrain.bench.data import HEIGHT, WIDTH, imagenet_like_jpegs, jpeg_benchmark_parser
from pretrain.config import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.decode import decode
from pretrain.data.transforms import normalize
from pretrain.data.views import MultiCropView, Photometric

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


def torchvision_dino(local_crops: int):
    """DINO's DataAugmentationDINO (Caron et al. 2021, main_dino.py), written with torchvision."""
    from torchvision import transforms as T

    flip_and_jitter = T.Compose([T.RandomHorizontalFlip(p=0.5),
                                 T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                                 T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])

    def blur(p):
        return T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=p)

    bicubic = T.InterpolationMode.BICUBIC
    global1 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_and_jitter,
                         blur(1.0), norm])
    global2 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_and_jitter,
                         blur(0.1), T.RandomSolarize(128, p=0.2), norm])
    local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic), flip_and_jitter,
                       blur(0.5), norm])

    def views(jpeg: bytes) -> list[torch.Tensor]:
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        return [global1(image), global2(image)] + [local(image) for _ in range(local_crops)]

    return views


def run_baseline(jpegs: list[bytes], local_crops: int) -> float:
    views = torchvision_dino(local_crops)
    start = time.perf_counter()
    for jpeg in jpegs:
        views(jpeg)
    return len(jpegs) / (time.perf_counter() - start)


def run_worker(jpegs: list[bytes], local_crops: int, photometric: bool, batch: int = 32) -> float:
    view = MultiCropView(224, (0.4, 1.0), 96, (0.05, 0.4), local_crops)
    augment = (Photometric(blur=1.0), Photometric(blur=0.1, solarize=0.2), Photometric(blur=0.5))
    start = time.perf_counter()
    pending = []
    for i, jpeg in enumerate(jpegs):
        image, _ = decode({"__key__": str(i), "jpg": jpeg, "cls": b"0"})
        pending.append(view(image))
        if photometric and (len(pending) == batch or i == len(jpegs) - 1):
            globals_ = torch.stack([p["global"] for p in pending])
            locals_ = torch.stack([p["local"] for p in pending]).flatten(0, 1)
            for images, aug in ((globals_[:, 0], augment[0]), (globals_[:, 1], augment[1]), (locals_, augment[2])):
                normalize(aug(images).mul_(255), MEAN, STD, torch.float32)
            pending = []
        elif not photometric:
            pending = []
    return len(jpegs) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = jpeg_benchmark_parser("views", __doc__.split("\n")[0], 64, "images per round", 3)
    parser.add_argument("--local-crops", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    jpegs = imagenet_like_jpegs(args.images)
    rows = {"torchvision/PIL (DINO's augmentation)": [], "vitscale worker (decode + crops)": [],
            "vitscale worker + photometric on this CPU": []}
    for _ in range(args.rounds):
        rows["torchvision/PIL (DINO's augmentation)"].append(run_baseline(jpegs, args.local_crops))
        rows["vitscale worker (decode + crops)"].append(run_worker(jpegs, args.local_crops, photometric=False))
        rows["vitscale worker + photometric on this CPU"].append(run_worker(jpegs, args.local_crops, photometric=True))
    crops = 2 + args.local_crops
    print(f"DINO views: 2 x 224 + {args.local_crops} x 96 from about {WIDTH}x{HEIGHT} JPEGs, one core, "
          f"{args.images} images x {args.rounds} rounds")
    print(f"{'pipeline':<44} {'images/s':>9} {'crops/s':>9}")
    medians = {}
    for name, values in rows.items():
        medians[name] = statistics.median(values)
        print(f"{name:<44} {medians[name]:>9.1f} {medians[name] * crops:>9.0f}")
    base = medians["torchvision/PIL (DINO's augmentation)"]
    with_photo = medians["vitscale worker + photometric on this CPU"] / base
    print(f"ratio {medians['vitscale worker (decode + crops)'] / base:.2f} (vitscale worker over torchvision/PIL, "
          f"images/s per core; {with_photo:.2f} with the photometric part also on this CPU)")
    return 0
