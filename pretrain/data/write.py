"""Write shuffled shards and their index from an image folder, ImageNet-21K tars or a Hub Parquet set.

    python -m pretrain.data.write SRC OUT [--per-shard N | --shard-bytes B] [--workers K]
                                  [--max-side S] [--val-fraction F] [--seed S] [--format tar|parquet]
                                  [--split train|val] [--image-column C] [--label-column C]

SRC is a folder with one sub-folder per class, a folder of per-class tars (ImageNet-21K's
``n01440764.tar`` ...: the class is the tar's name), or a Hugging Face Hub Parquet set: one
``.parquet`` file, or a dataset repo on disk, whose ``--split`` split is read (its files' split from
their names, as a run reads a repo; the classes from their ClassLabel; the image and label columns
as a run finds them, or named by ``--image-column`` and ``--label-column``). Each sample holds the
image under its own extension (``jpg``, ``png``, ``webp``: the original bytes, unless ``--max-side`` shrinks it or its
format must be re-encoded as JPEG), ``cls`` (the class index as text) and ``json`` (class name,
source name, stored size). ``--format`` picks the shards' format: WebDataset tars (default; one
file per extension) or Parquet (one row per sample, as the ``datasets`` library writes an image set:
``load_dataset("parquet", ...)`` reads its ``image`` as an Image and its ``label`` as a ClassLabel;
:mod:`pretrain.data.readers.parquet`). ``OUT/index.json`` lists shards, sample counts and class names;
readers take epoch lengths and the class count from it. ``OUT/report.json`` lists the inputs that
could not be read.

Images are shuffled globally; the rows of a Parquet set move with their row group (each shard takes
the rows of a few row groups, mixed, so that every row group is read about once).

The output depends only on the inputs and the options: shards are planned before any is written,
so ``--workers`` write them in parallel, and a second run with the same options keeps the shards
that are finished (``OUT/.write/`` remembers them) and writes the rest.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable

from PIL import Image

from pretrain.data import readers
from pretrain.data.decode import load_rgb
from pretrain.data.hub import repo_shards, resolve_repo
from pretrain.data.readers.parquet import Columns, footer
from pretrain.data.shards import IMAGE_EXTENSIONS, ShardError, write_index
from pretrain.errors import UserError, reported
from pretrain.files import atomic_write
from pretrain.rundir import RunDirBusy, hold

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SOURCE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
REENCODE_QUALITY = 90
PROGRESS_DIR = ".write"


class WriteError(UserError, ValueError):
    """A source or an output directory that cannot be used; the message names it."""


@dataclass
class Item:
    """One image to write: where it came from, its class, and where its bytes are.

    The bytes are ``data``, or the file ``path``, or ``size`` bytes at ``offset`` inside the tar
    ``path``, or, with ``group`` (its row group's first row and rows), row ``offset`` of the Parquet
    file ``path`` (read by :func:`write_shard`, a row group at a time; ``size`` is an estimate).
    """

    source: str
    label: int
    path: str = ""
    offset: int | None = None
    size: int = 0
    data: bytes | None = None
    group: tuple[int, int] | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: {len(data)} of {self.size} bytes at offset {self.offset}")
        return data


# -- listing the inputs ---------------------------------------------------------------------------

def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in SOURCE_SUFFIXES


def folder_items(src: Path) -> tuple[list[str], list[Item]]:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    items = []
    for label, name in enumerate(classes):
        for path in sorted((src / name).rglob("*")):
            if _is_image_name(path.name) and path.is_file():
                items.append(Item(f"{name}/{path.relative_to(src / name)}", label, str(path),
                                  size=path.stat().st_size))
    return classes, items


def _tar_members(job: tuple[int, str]) -> tuple[list[Item], list[dict]]:
    label, path = job
    items, problems = [], []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isreg() and _is_image_name(member.name):
                    items.append(Item(f"{Path(path).name}/{member.name}", label, path,
                                      member.offset_data, member.size))
    except (OSError, tarfile.TarError) as e:  # the members listed so far are kept
        problems.append({"source": path, "error": f"{type(e).__name__}: {e}"})
    return items, problems


def synset_tar_items(src: Path, pool=None) -> tuple[list[str], list[Item], list[dict]]:
    tars = sorted(p for p in src.iterdir() if p.suffix == ".tar" and p.is_file())
    classes = [p.stem for p in tars]
    jobs = list(enumerate(str(p) for p in tars))
    results = pool.imap(_tar_members, jobs, chunksize=16) if pool else map(_tar_members, jobs)
    items, problems = [], []
    for found, broken in results:
        items.extend(found)
        problems.extend(broken)
    return classes, items, problems


def parquet_sources(src: Path, split: str, columns: Columns) -> list[str]:
    """The Parquet files of a Hub set: ``src`` itself, or a repo directory's ``split``; [] for a source
    that is no Parquet set (an image folder, synset tars)."""
    if src.is_file() and src.suffix == ".parquet":
        return [str(src)]
    if not src.is_dir() or not any(p.suffix == ".parquet" for p in repo_shards(src)):
        return []
    try:
        urls = resolve_repo(src, split, columns).urls
    except ShardError as e:
        raise WriteError(str(e)) from None
    return [u for u in urls if u.endswith(".parquet")]


def parquet_items(urls: list[str], columns: Columns) -> tuple[list[str], list[Item], list[dict]]:
    """(class names, one Item per labelled row in file and row order, rows without a label) of
    Parquet files; the class names from their ClassLabel (the same in every file: resolve_repo
    checked a repo's), else the class numbers as text."""
    import pyarrow.parquet as pq

    classes, items, problems = None, [], []
    for url in urls:
        try:
            rows, found = footer(url, columns)
        except ShardError as e:
            raise WriteError(f"{url}: {e}") from None
        shard = pq.ParquetFile(url)
        if found.label is None:
            raise WriteError(f"{url}: no label column with one class per image (looked for label, labels, cls, ...; "
                             f"columns: {shard.schema_arrow.names}): name it with --label-column")
        classes = classes or found.classes
        labels = shard.read(columns=[found.label], use_threads=False).column(0).to_pylist()
        first = 0
        for group in range(shard.num_row_groups):
            meta = shard.metadata.row_group(group)
            per_row = meta.total_byte_size // max(meta.num_rows, 1)
            for row in range(first, first + meta.num_rows):
                if labels[row] is None or labels[row] < 0:
                    problems.append({"source": f"{url}/{row}", "error": f"no label ({labels[row]})"})
                    continue
                items.append(Item(f"{Path(url).name}/{row}", labels[row], url, row, per_row,
                                  group=(first, meta.num_rows)))
            first += meta.num_rows
    if classes is None:
        classes = [str(c) for c in range(max((item.label for item in items), default=-1) + 1)]
    return classes, items, problems


def list_source(src: Path, pool=None, split: str = "train",
                columns: Columns = Columns()) -> tuple[list[str], list[Item], list[dict]]:
    """(class names, items in a deterministic order, listing problems) of an image folder, a tar
    folder, or a Hub Parquet set (a file, or a repo directory's ``split``)."""
    parquet = parquet_sources(src, split, columns)
    if parquet:
        classes, items, problems = parquet_items(parquet, columns)
        if not items:
            raise WriteError(f"{src}: no labelled rows in {len(parquet)} Parquet files")
        return classes, items, problems
    if not src.is_dir():
        raise WriteError(f"{src} is neither a directory nor a .parquet file")
    if any(p.suffix == ".tar" for p in src.iterdir()):
        classes, items, problems = synset_tar_items(src, pool)
    else:
        classes, items = folder_items(src)
        problems = []
    if not classes:
        raise WriteError(f"{src} has neither class sub-folders nor per-class .tar files")
    if not items:
        raise WriteError(f"{src}: no images (looked for {', '.join(sorted(SOURCE_SUFFIXES))})")
    return classes, items, problems


# -- one sample -----------------------------------------------------------------------------------

def image_record(data: bytes, max_side: int | None = None) -> tuple[str, bytes, tuple[int, int]]:
    """(extension, bytes, (width, height)) to store for an image's bytes; raises if it cannot be decoded.

    The original bytes are kept for the formats readers decode, unless the image is larger than
    ``max_side``; then, and for other formats, it is re-encoded as a JPEG.
    """
    with Image.open(io.BytesIO(data)) as image:
        ext = KEPT_FORMATS.get(image.format)
        size = image.size
        too_big = max_side is not None and max(size) > max_side
        if ext and not too_big:
            if image.format == "JPEG":
                # A 1/8-scale decode still reads every byte; at least 1 px a side (draft divides by it).
                image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()  # a truncated or corrupt file fails here, not in a training run
            return ext, data, size
        target = size
        if too_big:
            scale = max_side / max(size)
            target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        image = load_rgb(image, reduce_to=target)  # 16-bit, CMYK, palette ... -> RGB; JPEGs at reduced scale
        if image.size != target:
            image = image.resize(target, Image.BICUBIC, reducing_gap=3.0)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=REENCODE_QUALITY)
        return "jpg", out.getvalue(), image.size


# -- planning and writing shards -----------------------------------------------------------------

@dataclass
class ShardJob:
    out: str
    name: str
    items: list[Item]
    classes: list[str]
    max_side: int | None
    format: str = "tar"
    columns: Columns = Columns()  # a Parquet source's image and label columns


def plan_shards(items: list[Item], per_shard: int | None, shard_bytes: int | None) -> list[list[Item]]:
    """Cut ``items`` (in order) into shards of ``per_shard`` items, or of about ``shard_bytes`` input bytes."""
    if shard_bytes is None:
        return [items[i:i + per_shard] for i in range(0, len(items), per_shard)]
    shards, current, total = [], [], 0
    for item in items:
        current.append(item)
        total += item.size + 1024  # tar headers and the cls/json members
        if total >= shard_bytes:
            shards.append(current)
            current, total = [], 0
    if current:
        shards.append(current)
    return shards


def parquet_rows(items: list[Item], columns: Columns) -> tuple[dict, dict]:
    """({(path, row): image bytes}, {(path, row): why it could not be read}) for the Parquet rows
    among ``items``, each of their row groups read once, by the reader a run uses."""
    wanted: dict[tuple[str, int, int], set[int]] = {}
    for item in items:
        if item.group is not None:
            wanted.setdefault((item.path, *item.group), set()).add(item.offset)
    images, broken = {}, {}
    for (path, first, rows), positions in sorted(wanted.items()):
        try:
            for position, raw in enumerate(readers.parquet.samples(path, first, columns=columns), first):
                if position in positions:
                    images[path, position] = next((raw[e] for e in IMAGE_EXTENSIONS if e in raw), None)
                if position + 1 >= first + rows:
                    break
        except ShardError as e:  # BrokenShard: the rows not read yet are listed in the report
            broken.update({(path, p): str(e) for p in positions if (path, p) not in images})
    return images, broken


def write_shard(job: ShardJob) -> dict:
    """Write one shard atomically, then its record in ``OUT/.write``; returns the record."""
    out = Path(job.out)
    samples, skipped = [], []
    items = job.items
    rows, broken = parquet_rows(items, job.columns)
    if rows or broken:  # a shard of whole row groups: mix their rows, the same way on every run
        items = list(items)
        random.Random(job.name).shuffle(items)
    for item in items:
        try:
            if item.group is not None:
                if (item.path, item.offset) in broken:
                    raise OSError(broken[item.path, item.offset])
                data = rows[item.path, item.offset]
                if data is None:
                    raise ValueError("no image in the row")
            else:
                data = item.read()
            ext, data, size = image_record(data, job.max_side)
        except Exception as e:  # unreadable or not an image: listed in the report, not fatal
            skipped.append({"source": item.source, "error": f"{type(e).__name__}: {e}"})
            continue
        meta = {"class": job.classes[item.label], "source": item.source, "size": list(size)}
        samples.append({"__key__": f"{job.name.split('.', 1)[0]}-{len(samples):06d}", ext: data,
                        "cls": str(item.label).encode(), "json": json.dumps(meta).encode()})
    payload = readers.FORMATS[job.format].shard_bytes(samples, classes=job.classes)
    atomic_write(out / job.name, payload)  # a shard is either whole or absent
    record = {"name": job.name, "samples": len(samples), "bytes": len(payload), "skipped": skipped,
              "inputs": len(job.items)}
    atomic_write(out / PROGRESS_DIR / (job.name + ".json"), json.dumps(record).encode())
    return record


def shuffled(items: list[Item], seed: int) -> list[Item]:
    """``items`` in a random order drawn from ``seed``. Rows of a Parquet set move with their row
    group (the groups are shuffled, and :func:`write_shard` mixes the rows of its shard): a shard then
    reads a few row groups whole, where single rows from everywhere would read each group once per row."""
    rng = random.Random(seed)
    if not any(item.group is not None for item in items):
        rng.shuffle(items)
        return items
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault((item.path, item.group), []).append(item)
    order = list(groups)
    rng.shuffle(order)
    return [item for key in order for item in groups[key]]


def _fingerprint(items: list[Item], options: dict) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for item in items:
        digest.update(f"{item.source}\0{item.label}\0{item.size}\n".encode())
    return digest.hexdigest()


def _done(out: Path, name: str) -> dict | None:
    record_path = out / PROGRESS_DIR / (name + ".json")
    if not (record_path.exists() and (out / name).exists()):
        return None
    record = json.loads(record_path.read_text())
    return record if (out / name).stat().st_size == record["bytes"] else None


def _holding_out_dir(write):
    """``write`` with its output directory held for the whole write (pretrain.rundir's lock): a second
    writer, or a run, on the same directory is refused at once. Without it two writers started together
    both pass the plan check and interleave the shards of two plans."""
    @functools.wraps(write)
    def held(items, classes, out: Path, *args, **kwargs):
        try:
            with hold(out, holder="shard writer", advice="write into another directory"):
                return write(items, classes, out, *args, **kwargs)
        except RunDirBusy as e:
            raise WriteError(str(e)) from None
    return held


@_holding_out_dir
def write_shards(items: Iterable[Item], classes: list[str], out: Path, *, per_shard: int | None = 1000,
                 shard_bytes: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                 max_side: int | None = None, workers: int = 0, problems: list[dict] | None = None,
                 progress: bool = False, pool=None, split: str = "train", shard_format: str = "tar",
                 columns: Columns = Columns()) -> dict:
    """Shuffle ``items`` with ``seed``, hold out ``val_fraction``, write both splits, the index and
    the report. Finished shards of an earlier run with the same inputs and options are kept.
    ``split`` names what is not held out: ``val`` writes a separate validation set (ImageNet's val/).
    ``shard_format`` is a shard format of :mod:`pretrain.data.readers` (``tar`` or ``parquet``);
    ``columns``, a Parquet source's image and label columns.

    Returns ``{"splits": {split: [{name, samples}, ...]}, "skipped": [...], "written": n, "kept": n}``.
    """
    if split not in ("train", "val") or (split == "val" and val_fraction):
        raise WriteError(f"split={split!r}: must be 'train', or 'val' without a held-out fraction")
    if shard_format not in readers.FORMATS:
        raise WriteError(f"shard_format={shard_format!r}: must be one of {sorted(readers.FORMATS)}")
    items = shuffled(list(items), seed)
    n_val = int(round(len(items) * val_fraction))
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    options = {"per_shard": per_shard, "shard_bytes": shard_bytes, "val_fraction": val_fraction, "seed": seed,
               "max_side": max_side, "classes": classes}
    if split != "train":  # only then, so that earlier writes keep their fingerprint and resume
        options["split"] = split
    if shard_format != "tar":  # likewise
        options["format"] = shard_format
    if columns != Columns():
        options["columns"] = [columns.image, columns.label]
    plan_path = out / PROGRESS_DIR / "plan.json"
    fingerprint = _fingerprint(items, options)
    if plan_path.exists() and json.loads(plan_path.read_text())["fingerprint"] != fingerprint:
        raise WriteError(f"{out} holds shards of other inputs or options ({plan_path}): write into a new "
                         f"directory, or repeat the earlier command to finish it")
    atomic_write(plan_path, json.dumps({"fingerprint": fingerprint, "options": options}).encode())

    jobs, split_names = [], {}
    parts = [(split, items[n_val:])] + ([("val", items[:n_val])] if split == "train" else [])
    for name, part in parts:
        shards = plan_shards(part, per_shard, shard_bytes)
        suffix = readers.FORMATS[shard_format].SUFFIXES[0]
        split_names[name] = [f"{name}-{i:06d}{suffix}" for i in range(len(shards))]
        jobs += [ShardJob(str(out), shard_name, shard, classes, max_side, shard_format, columns)
                 for shard_name, shard in zip(split_names[name], shards)]
    records = {}
    for job in jobs:
        record = _done(out, job.name)
        if record is not None:
            records[job.name] = record
    todo = [job for job in jobs if job.name not in records]
    bar = _Progress(sum(len(job.items) for job in todo), progress)
    own_pool = None
    if pool is None and workers > 1 and len(todo) > 1:
        pool = own_pool = get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)
    try:
        results = pool.imap_unordered(write_shard, todo) if pool else map(write_shard, todo)
        for record in results:
            records[record["name"]] = record
            bar.update(record["inputs"])
    finally:
        bar.close()
        if own_pool is not None:
            own_pool.close()
            own_pool.join()
    splits = {split: [{"name": n, "samples": records[n]["samples"]} for n in names]
              for split, names in split_names.items() if names}
    skipped = list(problems or []) + [s for job in jobs for s in records[job.name]["skipped"]]
    atomic_write(out / "report.json", json.dumps({"skipped": skipped}, indent=1).encode())
    write_index(out, classes, splits, extra={"seed": seed, "max_side": max_side})
    return {"splits": splits, "skipped": skipped, "written": len(todo), "kept": len(jobs) - len(todo)}


class _Progress:
    """A tqdm bar in images (its rate is images/s) when asked for, else nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", unit_scale=True, smoothing=0.05, desc="writing")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be positive")
    return value


def _byte_count(text: str) -> int:
    """``500000000``, ``500MB``, ``1GiB`` ... -> bytes."""
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3}
    number = text.lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if number.endswith(suffix):
            try:
                value = int(float(number[:len(number) - len(suffix)]) * units[suffix])
            except ValueError:
                break
            if value > 0:
                return value
            break
    raise argparse.ArgumentTypeError(f"{text!r}: not a positive size (e.g. 500MB, 1GiB, 100000)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data.write", description=__doc__.split("\n\n")[0],
                                     epilog="See docs/data.md for ImageNet-21K.")
    parser.add_argument("src", type=Path, help="image folder (one sub-folder per class), folder of per-class tars, "
                                               "or a Hub Parquet set (a .parquet file or a dataset repo on disk)")
    parser.add_argument("out", type=Path, help="output directory for shards, index.json and report.json")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--per-shard", type=_positive_int, help="images per shard (default 1000)")
    size.add_argument("--shard-bytes", type=_byte_count,
                      help="about this many input bytes per shard, e.g. 500MB (instead of --per-shard)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes listing and writing in parallel (default: all cores)")
    parser.add_argument("--max-side", type=_positive_int, help="re-encode images whose longer side exceeds this")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images held out as val (default 0)")
    parser.add_argument("--split", choices=["train", "val"], default="train",
                        help="the split the images become (default train); --split val writes a separate "
                             "validation folder, such as ImageNet's val/, into its own directory; from a Hub "
                             "repo, the split that is read")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--format", choices=sorted(readers.FORMATS), default="tar",
                        help="shard format: tar (WebDataset, default) or parquet (one row per image)")
    parser.add_argument("--image-column", help="a Parquet source's image column, if not one a run looks for "
                                               "(as data.image_column)")
    parser.add_argument("--label-column", help="a Parquet source's label column (as data.label_column)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.src.is_dir() and not (args.src.is_file() and args.src.suffix == ".parquet"):
        parser.error(f"{args.src} is neither a directory nor a .parquet file")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    if args.split == "val" and args.val_fraction:
        parser.error("--split val writes every image as val: leave out --val-fraction")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    per_shard = None if args.shard_bytes else (args.per_shard or 1000)
    return reported(_write, args, per_shard)


def _write(args: argparse.Namespace, per_shard: int | None) -> int:
    """Write the shards ``args`` asks for and print what was written."""
    started = time.perf_counter()
    pool = get_context("fork" if sys.platform == "linux" else "spawn").Pool(args.workers) if args.workers > 1 else None
    try:
        columns = Columns(args.image_column, args.label_column)
        classes, items, problems = list_source(args.src, pool, args.split, columns)
        print(f"{len(items)} images in {len(classes)} classes", file=sys.stderr)
        result = write_shards(items, classes, args.out, per_shard=per_shard, shard_bytes=args.shard_bytes,
                              val_fraction=args.val_fraction, seed=args.seed, max_side=args.max_side,
                              problems=problems, progress=not args.no_progress, pool=pool, split=args.split,
                              shard_format=args.format, columns=columns)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - started
    for split, shards in result["splits"].items():
        print(f"{split}: {sum(s['samples'] for s in shards)} samples in {len(shards)} shards")
    if result["kept"]:
        print(f"kept {result['kept']} shards finished by an earlier run, wrote {result['written']}")
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable inputs, listed in {args.out / 'report.json'}")
    print(f"{len(items) / max(elapsed, 1e-9):.0f} images/s; index: {args.out / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
