"""Where samples live: shard URL lists, the writer's index file, and opening one shard's bytes.

What a shard holds, and how it is read, is its format's (:mod:`pretrain.data.readers`).

A source (``data.train`` / ``data.val``) is one of:
- a directory written by ``pretrain.data.write`` (its ``index.json`` names shards, counts and classes);
- a brace pattern (``/data/in21k/train-{000000..001023}.tar``);
- a list of paths or URLs (``pipe:`` commands, ``http(s)://``, or any fsspec URL whose backend is installed:
  ``hf://`` with huggingface_hub, ``s3://`` ...; glob patterns in those are expanded, :mod:`pretrain.data.remote`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import select
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import braceexpand

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


def resolve(source: str | list[str], split: str, columns=None, timeout: float | None = None) -> ShardSet:
    """The shards a source names; for a writer directory, those of ``split`` (``train`` or ``val``),
    or of its only split (a validation folder written on its own); for a directory without an index
    (a Hub dataset repo) or Parquet files, with what their names and footers say
    (:mod:`pretrain.data.hub`; ``columns``: the Parquet columns a user named; ``timeout``: seconds a
    remote request for a footer may take, ``data.shard_timeout``)."""
    from pretrain.data import hub  # here: hub reads footers through the readers, which import this module
    from pretrain.data.readers.parquet import Columns

    columns = columns or Columns()
    if isinstance(source, str) and is_local(source) and Path(source).expanduser().is_dir():
        directory = Path(source).expanduser()
        if (directory / INDEX_NAME).exists():
            return read_index(directory, split)
        return hub.resolve_repo(directory, split, columns)
    return hub.described(expand(source), columns, timeout)


def expand(source: str | list[str]) -> list[str]:
    """The shard URLs a brace pattern or list names, remote glob patterns (``hf://.../train-*.parquet``)
    expanded; ShardError when there are none, or when a remote URL's fsspec backend is not installed."""
    from pretrain.data import remote  # here: remote raises this module's errors

    items = [source] if isinstance(source, str) else list(source)
    urls = []
    for url in (url for item in items for url in braceexpand.braceexpand(item)):
        urls += remote.expand_glob(url) if remote.is_remote(url) and remote.has_glob(url) else [url]
    if not urls:
        raise ShardError(f"no shards in {source!r}")
    first_of_protocol: dict[str, str] = {}
    for url in urls:
        if remote.is_remote(url):
            first_of_protocol.setdefault(url.split("://", 1)[0], url)
    for url in first_of_protocol.values():
        remote.filesystem(url)  # a missing backend is named now, not when a data worker opens the shard
    return [os.path.expanduser(u) if is_local(u) else u for u in urls]


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


class PipeShard(io.RawIOBase):
    """The output of a ``pipe:`` shard's shell command, read with a stall timeout.

    The command runs in its own process group; closing the stream kills the whole group, so a
    stalled or abandoned command (and whatever it started) never outlives its shard.
    """

    def __init__(self, command: str, timeout: float | None) -> None:
        super().__init__()
        self.command, self.timeout = command, timeout
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise ShardStalled(f"pipe:{self.command}: no data for {self.timeout:g} s (data.shard_timeout)")
        data = os.read(self.fd, len(buffer))
        buffer[:len(data)] = data
        if not data and self.proc.wait() != 0:
            raise OSError(f"pipe:{self.command}: exited with status {self.proc.returncode}")
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.stdout.close()
            self.proc.wait()
        super().close()


def open_shard(url: str, timeout: float | None = None) -> IO[bytes]:
    """A shard's bytes, to read from start to end; a ``pipe:`` command that sends nothing, or a remote
    request that returns nothing, for ``timeout`` seconds raises ShardStalled."""
    if is_local(url):
        return open(url, "rb")
    scheme = url.split(":", 1)[0]
    if scheme == "pipe":
        return io.BufferedReader(PipeShard(url.removeprefix("pipe:"), timeout), buffer_size=1 << 20)
    if scheme in ("http", "https"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    from pretrain.data import remote  # hf://, s3://, gs://, ... through whatever backend the user installed

    return remote.open_stream(url, timeout)
