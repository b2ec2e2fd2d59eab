"""Training-pipeline images/s per worker process: a plain torchvision/PIL baseline against vitscale's.

    python -m pretrain.bench data [--images N] [--rounds R] [--size S]

Both read the same tar shards of ImageNet-like JPEGs (about 500x375, quality 90, cut from
scikit-image's sample photos) in one process with one thread, i.e. one core:

- baseline: WebDataset's PIL decoding, then torchvision's RandomResizedCrop, flip, ToTensor and
  Normalize, batched;
- vitscale: ``ShardDataset`` with the supervised view (reduced JPEG decoding, crop before resize,
  uint8 batches; normalization belongs to the device), photometric augmentation off in both;
- decode-only: PIL's full-size decoding of the same bytes, held in memory: the ceiling of a
  pipeline that decodes every pixel with PIL (the ceiling the data pipeline's goal is read against). For information, the table
  also shows simplejpeg's full-size decoding, which vitscale uses for JPEGs.

Rounds alternate between the pipelines so that load from other processes hits all of them alike;
the table shows each pipeline's median. The last line is the speed-up over the baseline.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pretrain.data.readers.tar import shard_bytes as tar_bytes
from pretrain.data.stream import ShardDataset
from pretrain.data.transforms import SupervisedTrainView

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry")
WIDTH, HEIGHT = 500, 375


def imagenet_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of about 500x375 (landscape or portrait, like ImageNet's), quality 90."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(data, name)()) for name in PHOTOS]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = (WIDTH, HEIGHT) if rng.random() < 0.75 else (HEIGHT, WIDTH)
        w, h = int(w * rng.uniform(0.85, 1.15)), int(h * rng.uniform(0.85, 1.15))
        # Enlarge small photos by a random factor so that crops differ, then cut one at random.
        grow = max(w / photo.width, h / photo.height, 1.0) * rng.uniform(1.0, 1.6)
        big = photo.resize((round(photo.width * grow), round(photo.height * grow)), Image.BICUBIC)
        left, top = rng.integers(0, big.width - w + 1), rng.integers(0, big.height - h + 1)
        buffer = io.BytesIO()
        big.crop((left, top, left + w, top + h)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_shards(jpegs: list[bytes], directory: Path, per_shard: int = 100) -> list[str]:
    urls = []
    for start in range(0, len(jpegs), per_shard):
        samples = [{"__key__": f"{start + i:06d}", "jpg": data, "cls": str((start + i) % 10).encode()}
                   for i, data in enumerate(jpegs[start:start + per_shard])]
        path = directory / f"bench-{start // per_shard:04d}.tar"
        path.write_bytes(tar_bytes(samples))
        urls.append(str(path))
    return urls


def baseline_pipeline(urls: list[str], size: int, batch_size: int):
    import webdataset as wds
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
            .to_tuple("jpg", "cls").map_tuple(transform, int).batched(batch_size))


def vitscale_pipeline(urls: list[str], size: int, batch_size: int):
    view = SupervisedTrainView(size, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, None, 0.0, "bilinear",
                               (0.485, 0.456, 0.406))
    return ShardDataset(urls, view, batch_size, rank=0, world_size=1, seed=0, train=False)


def timed(batches, images: int) -> float:
    """Images per second over the first ``images`` images of an iterable of batches."""
    started, done = time.perf_counter(), 0
    for batch in batches:
        done += len(batch[1] if isinstance(batch, (tuple, list)) else batch["label"])
        if done >= images:
            break
    return done / (time.perf_counter() - started)


def decode_only(jpegs: list[bytes]) -> float:
    started = time.perf_counter()
    for data in jpegs:
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(jpegs) / (time.perf_counter() - started)


def decode_only_simplejpeg(jpegs: list[bytes]) -> float:
    import simplejpeg

    started = time.perf_counter()
    for data in jpegs:
        simplejpeg.decode_jpeg(data, "RGB")
    return len(jpegs) / (time.perf_counter() - started)


def jpeg_benchmark_parser(name: str, description: str, images: int, images_help: str,
                          rounds: int) -> argparse.ArgumentParser:
    """The command line of a benchmark over ``--images`` ImageNet-like JPEGs in ``--rounds`` rounds
    (its own options are added to it)."""
    parser = argparse.ArgumentParser(prog=f"python -m pretrain.bench {name}", description=description)
    parser.add_argument("--images", type=int, default=images, help=f"{images_help} (default {images})")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds per pipeline (default {rounds})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = jpeg_benchmark_parser("data", __doc__.split("\n\n")[0], 1000, "JPEGs written and read per round", 5)
    parser.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    jpegs = imagenet_like_jpegs(args.images)
    mean_side = statistics.mean(sum(Image.open(io.BytesIO(j)).size) / 2 for j in jpegs)
    with tempfile.TemporaryDirectory(prefix="vitscale-bench-") as tmp:
        urls = write_shards(jpegs, Path(tmp))
        rates: dict[str, list[float]] = {"decode-only, PIL (ceiling)": [], "baseline (torchvision/PIL)": [],
                                         "vitscale": [], "decode-only, simplejpeg": []}
        for _ in range(args.rounds + 1):  # the first round warms caches and is not counted
            round_rates = [decode_only(jpegs),
                           timed(baseline_pipeline(urls, args.size, args.batch_size), len(jpegs)),
                           timed(vitscale_pipeline(urls, args.size, args.batch_size), len(jpegs)),
                           decode_only_simplejpeg(jpegs)]
            for name, rate in zip(rates, round_rates):
                rates[name].append(rate)
    medians = {name: statistics.median(values[1:]) for name, values in rates.items()}
    ceiling, baseline, ours, _ = medians.values()
    print(f"{len(jpegs)} JPEGs, mean side {mean_side:.0f} px, quality 90; crop {args.size}; "
          f"1 process, 1 thread; median of {args.rounds} rounds")
    print(f"{'pipeline':<28} {'images/s':>9} {'of ceiling':>11}")
    for name, rate in medians.items():
        print(f"{name:<28} {rate:9.0f} {rate / ceiling:11.2f}")
    print(f"ratio {ours / baseline:.2f} (vitscale / baseline images per second per core)")
    return 0
