"""What every part of the data pipeline says about shards: their errors, a resolved set of them
(:class:`ShardSet`) and the writer's index file.

The bottom of the data layers: it imports none of them. Above it, :mod:`pretrain.data.remote`
(fsspec), :mod:`pretrain.data.urls` (a shard URL's bytes, patterns of URLs), the readers
(:mod:`pretrain.data.readers`: what a shard holds, and how it is read), :mod:`pretrain.data.hub`, and
:mod:`pretrain.data.sources` (what ``data.train`` / ``data.val`` name).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import UserError
from pretrain.files import atomic_write

INDEX_NAME = "index.json"
INDEX_FORMAT = "vitscale-shards/1"
# "image": a Hub image column's bytes in another format than these (GIF, BMP, TIFF), which PIL reads
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "image")

log = logging.getLogger(__name__)


class ShardError(UserError, ValueError):
    """A shard source that cannot be used; the message names the shards or the file."""


# Why a shard (or the rest of one) could not be read: the counters a reader files it under. They
# count the samples the shard took away, not samples read.
SHARD_REASONS = frozenset({"empty_shard", "unreadable_shard", "truncated_shard", "corrupt_shard", "stalled_shard"})


class BrokenShard(ShardError):
    """A shard that broke while a reader read it (after the samples it yielded, which are kept).

    ``reason`` is one of SHARD_REASONS; the message says what is wrong, the reader's original error
    is the ``__cause__``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in SHARD_REASONS, reason
        super().__init__(detail)
        self.reason = reason


@dataclass
class ShardSet:
    urls: list[str]
    samples: int | None = None  # known when an index describes the shards
    classes: list[str] | None = None
    counts: list[int] | None = field(default=None, repr=False)  # samples per shard, aligned with urls
    # "class": a class index per sample (or not known: tars); "multi": lists of them; None: no labels
    labels: str | None = "class"


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def read_index(directory: Path, split: str) -> ShardSet:
    path = directory / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{directory} is a directory without {INDEX_NAME}: write it with "
                         f"`python -m pretrain.data.write` or name its shards with a brace pattern") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: unreadable index: {e}") from None
    if index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{path}: format {index.get('format')!r} is not {INDEX_FORMAT!r}")
    written = {name: entry for name, entry in index.get("splits", {}).items() if entry.get("shards")}
    if split not in written and len(written) == 1:
        (only,) = written
        log.info("%s has one split, %r: reading it as the %s set", directory, only, split)
        split = only
    entry = written.get(split)
    if not entry:
        raise ShardError(f"{path}: no {split!r} split (has: {sorted(index.get('splits', {}))})")
    shards = entry["shards"]
    return ShardSet(urls=[str(directory / s["name"]) for s in shards],
                    samples=sum(s["samples"] for s in shards),
                    classes=index.get("classes"),
                    counts=[s["samples"] for s in shards])


def check_train_and_val(train: ShardSet | None, val: ShardSet | None, train_source, val_source) -> None:
    """ShardError unless both indexes number the classes alike (a val set written apart from its
    train set gets its class numbers from its own folders), and unless a writer directory with one
    split serves as both (its only split would be read as val too)."""
    if train is None or val is None:
        return
    if train.classes is not None and val.classes is not None and train.classes != val.classes:
        differ = sorted(set(train.classes) ^ set(val.classes))
        detail = f"classes only in one of them: {differ[:5]}" if differ else "the same classes in another order"
        raise ShardError(f"data.val={val_source!r} numbers its {len(val.classes)} classes differently from "
                         f"data.train={train_source!r} ({len(train.classes)} classes; {detail})")
    if val.classes is not None and set(train.urls) == set(val.urls):
        raise ShardError(f"data.val={val_source!r} reads the very shards of data.train: write a val split "
                         f"(--val-fraction, or --split val from a separate folder)")


def write_index(directory: Path, classes: list[str], splits: dict[str, list[dict]], extra: dict = None) -> None:
    """Write ``index.json`` atomically: ``splits`` maps a split to ``[{name, samples}, ...]``."""
    index = {"format": INDEX_FORMAT, "classes": classes,
             "splits": {name: {"samples": sum(s["samples"] for s in shards), "shards": shards}
                        for name, shards in splits.items()},
             **(extra or {})}
    atomic_write(directory / INDEX_NAME, json.dumps(index, indent=1).encode())


def missing_shards(urls: list[str]) -> list[str]:
    """Local shards that do not exist or cannot be read (remote ones are checked when opened)."""
    return [u for u in urls if is_local(u) and not os.access(u, os.R_OK)]


class ShardStalled(OSError):
    """A streamed shard sent no data for longer than its timeout."""
