"""Write shuffled WebDataset shards and their index from an image folder (one sub-folder per class).

    python -m pretrain.data.write SRC OUT [--per-shard N] [--val-fraction F] [--seed S]

Each sample holds the image under its own extension (``jpg``, ``png``, ``webp``: original bytes;
other formats are re-encoded as JPEG), ``cls`` (the class index as text) and ``json`` (class name,
source name). ``OUT/index.json`` lists shards, sample counts and class names; readers take epoch
lengths and the class count from it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from pretrain.data.shards import tar_bytes, write_index

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SOURCE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


@dataclass
class Item:
    """One image to write: where it came from, its class, and how to get its bytes."""

    source: str
    label: int
    read: Callable[[], bytes]


def image_record(data: bytes) -> tuple[str, bytes]:
    """(extension, bytes): the original bytes for formats readers decode, else a JPEG re-encoding."""
    with Image.open(io.BytesIO(data)) as image:
        ext = KEPT_FORMATS.get(image.format)
        if ext:
            image.verify()
            return ext, data
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=95)
        return "jpg", out.getvalue()


def folder_items(src: Path) -> tuple[list[str], list[Item]]:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"error: {src} has no class sub-folders")
    items = []
    for label, name in enumerate(classes):
        for path in sorted((src / name).rglob("*")):
            if path.suffix.lower() in SOURCE_SUFFIXES and path.is_file():
                items.append(Item(f"{name}/{path.relative_to(src / name)}", label, path.read_bytes))
    return classes, items


def write_shards(items: Iterable[Item], classes: list[str], out: Path, *, per_shard: int = 1000,
                 val_fraction: float = 0.0, seed: int = 0) -> dict:
    """Shuffle ``items`` with ``seed``, hold out ``val_fraction`` and write both splits plus the index.

    Unreadable images are skipped and listed in ``OUT/report.json``. Returns the index's splits.
    """
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = int(round(len(items) * val_fraction))
    out.mkdir(parents=True, exist_ok=True)
    problems: list[dict] = []
    splits = {}
    for split, part in (("train", items[n_val:]), ("val", items[:n_val])):
        if not part:
            continue
        shards, buffer = [], []
        for item in part:
            try:
                ext, data = image_record(item.read())
            except Exception as e:  # unreadable or not an image: listed, not fatal
                problems.append({"source": item.source, "error": f"{type(e).__name__}: {e}"})
                continue
            meta = {"class": classes[item.label], "source": item.source}
            buffer.append({"__key__": f"{split}-{len(shards):06d}-{len(buffer):06d}", ext: data,
                           "cls": str(item.label).encode(), "json": json.dumps(meta).encode()})
            if len(buffer) == per_shard:
                shards.append(_write_shard(out, split, len(shards), buffer))
                buffer = []
        if buffer:
            shards.append(_write_shard(out, split, len(shards), buffer))
        splits[split] = shards
    (out / "report.json").write_text(json.dumps({"skipped": problems}, indent=1))
    write_index(out, classes, splits)
    return splits


def _write_shard(out: Path, split: str, number: int, samples: list[dict]) -> dict:
    name = f"{split}-{number:06d}.tar"
    tmp = out / (name + ".tmp")
    tmp.write_bytes(tar_bytes(samples))
    os.replace(tmp, out / name)  # a shard is either whole or absent
    return {"name": name, "samples": len(samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data.write", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="image folder with one sub-folder per class")
    parser.add_argument("out", type=Path, help="output directory for shards and index.json")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of samples held out as val")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"{args.src} is not a directory")
    if args.per_shard <= 0:
        parser.error(f"--per-shard {args.per_shard}: must be positive")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    classes, items = folder_items(args.src)
    splits = write_shards(items, classes, args.out, per_shard=args.per_shard,
                          val_fraction=args.val_fraction, seed=args.seed)
    for split, shards in splits.items():
        print(f"{split}: {sum(s['samples'] for s in shards)} samples in {len(shards)} shards")
    skipped = json.loads((args.out / "report.json").read_text())["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} unreadable inputs, listed in {args.out / 'report.json'}")
    print(f"index: {args.out / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
