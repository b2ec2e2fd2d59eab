"""Tiny shards for the data tests: keys that say where each sample came from, and every kind of bad sample."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.data import readers
from pretrain.data.readers.tar import shard_bytes as tar_bytes
from pretrain.data.shards import write_index

FORMATS = sorted(readers.FORMATS)  # the shard formats the stream tests run on
PARQUET_ROW_GROUP = 3  # tiny row groups: shares, resumes and breaks fall inside and between them


def image_bytes(pixels: np.ndarray | Image.Image, fmt: str = "JPEG", **save) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def tiny_jpeg(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image_bytes(pixels, quality=90)


def shard_bytes(samples: list[dict], fmt: str) -> bytes:
    """A shard of ``fmt`` holding ``samples``; Parquet ones in row groups of PARQUET_ROW_GROUP samples."""
    if fmt == "parquet":
        return readers.parquet.shard_bytes(samples, row_group=PARQUET_ROW_GROUP)
    return readers.FORMATS[fmt].shard_bytes(samples)


def shard_number(url: str) -> int:
    """3 for ``.../train-000003.tar`` or ``.parquet``."""
    return int(Path(url).name.split(".", 1)[0].rsplit("-", 1)[1])


def write_counted_shards(directory: Path, counts: list[int], classes: int = 3, index: bool = True,
                         fmt: str = "tar") -> list[str]:
    """Shards ``s{shard}-{i}`` of format ``fmt`` with ``counts[shard]`` tiny JPEGs each; an index too
    unless ``index=False``."""
    directory.mkdir(parents=True, exist_ok=True)
    entries, urls = [], []
    suffix = readers.FORMATS[fmt].SUFFIXES[0]
    for shard, count in enumerate(counts):
        samples = [{"__key__": f"s{shard}-{i}", "jpg": tiny_jpeg(shard * 1000 + i),
                    "cls": str((shard + i) % classes).encode()} for i in range(count)]
        name = f"train-{shard:06d}{suffix}"
        (directory / name).write_bytes(shard_bytes(samples, fmt))
        entries.append({"name": name, "samples": count})
        urls.append(str(directory / name))
    if index:
        write_index(directory, [f"c{c}" for c in range(classes)], {"train": entries})
    return urls


def bad_samples() -> dict[str, tuple[dict, str | None]]:
    """Every kind of problem a shard may hold: name -> (sample without key, skip reason or None if converted)."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    good_jpeg = image_bytes(photo, quality=90)
    good_png = image_bytes(photo, "PNG")
    wide = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    palette = Image.fromarray(photo).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return {
        "corrupt_jpeg": ({"jpg": b"\xff\xd8\xff\xe0" + rng.bytes(500), "cls": b"1"}, "undecodable"),
        "truncated_jpeg": ({"jpg": good_jpeg[:len(good_jpeg) // 2], "cls": b"1"}, "undecodable"),
        "truncated_png": ({"png": good_png[:len(good_png) // 2], "cls": b"1"}, "undecodable"),
        "missing_cls": ({"jpg": good_jpeg}, "no_label"),
        "bad_cls": ({"jpg": good_jpeg, "cls": b"seven"}, "bad_label"),
        "unknown_extension": ({"xyz": good_jpeg, "cls": b"1"}, "no_image"),
        "grayscale": ({"jpg": image_bytes(photo[..., 0]), "cls": b"1"}, None),
        "rgba": ({"png": image_bytes(np.dstack([photo, photo[..., :1]]), "PNG"), "cls": b"1"}, None),
        "cmyk": ({"jpg": image_bytes(Image.fromarray(photo).convert("CMYK")), "cls": b"1"}, None),
        "palette": ({"png": image_bytes(palette, "PNG"), "cls": b"1"}, None),
        "16bit": ({"png": image_bytes(Image.fromarray(wide), "PNG"), "cls": b"1"}, None),
        "1x1": ({"jpg": image_bytes(photo[:1, :1]), "cls": b"1"}, None),
        "20000x100": ({"png": image_bytes(np.zeros((100, 20000, 3), np.uint8), "PNG"), "cls": b"1"}, None),
    }


def write_bad_shards(directory: Path, good_per_shard: int = 10) -> dict:
    """Shards with every bad case among good samples, a truncated shard and an empty one.

    Returns {"urls", "good": usable keys, "skips": {reason: count per epoch}, "events": per shard, in
    read order, None for a usable sample or the reason it is skipped}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cases = list(bad_samples().items())
    half = len(cases) // 2
    skips: dict[str, int] = {}
    urls, entries, good_keys, events = [], [], [], []
    for shard, part in enumerate((cases[:half], cases[half:])):
        samples = [{"__key__": f"good{shard}-{i}", "jpg": tiny_jpeg(shard * 100 + i, 16), "cls": b"2"}
                   for i in range(good_per_shard)]
        good_keys += [s["__key__"] for s in samples]
        for name, (sample, reason) in part:
            samples.append({"__key__": f"case-{name}", **sample})
            if reason:
                skips[reason] = skips.get(reason, 0) + 1
            else:
                good_keys.append(f"case-{name}")
        samples.sort(key=lambda s: s["__key__"])
        reasons = dict(part)
        events.append([None if s["__key__"].startswith("good") else reasons[s["__key__"][5:]][1] for s in samples])
        name = f"train-{shard:06d}.tar"
        (directory / name).write_bytes(tar_bytes(samples))
        urls.append(str(directory / name))
        entries.append({"name": name, "samples": len(samples)})
    # A shard cut short mid-member: its first samples are read, then the reader moves on.
    whole = tar_bytes([{"__key__": f"cut-{i}", "jpg": tiny_jpeg(500 + i, 64), "cls": b"0"} for i in range(4)])
    cut = whole[:len(whole) * 5 // 8]
    (directory / "train-000002.tar").write_bytes(cut)
    readable = sum(1 for _ in _readable_keys(directory / "train-000002.tar"))
    good_keys += [f"cut-{i}" for i in range(readable)]
    urls.append(str(directory / "train-000002.tar"))
    entries.append({"name": "train-000002.tar", "samples": readable})
    skips["truncated_shard"] = 1
    events.append([None] * readable + ["truncated_shard"])
    (directory / "train-000003.tar").write_bytes(tar_bytes([]))
    urls.append(str(directory / "train-000003.tar"))
    skips["empty_shard"] = 1
    events.append(["empty_shard"])
    return {"urls": urls, "good": good_keys, "skips": skips, "events": events}


def _readable_keys(path: Path):
    import tarfile

    from pretrain.data.readers.tar import iter_tar_samples

    try:
        for sample in iter_tar_samples(str(path)):
            yield sample["__key__"]
    except tarfile.TarError:
        return
