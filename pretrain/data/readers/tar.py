"""The tar format (WebDataset): a shard is a tar whose files ``KEY.EXT`` make the samples, in order.

``samples(url, start, timeout)`` yields a shard's raw samples from position ``start`` (those before
it are read, not kept); a shard that breaks raises BrokenShard after the samples read so far.
``shard_bytes(samples)`` writes one.
"""

from __future__ import annotations

import io
import tarfile
from contextlib import closing
from typing import IO, Iterator

from pretrain.data.shards import BrokenShard, ShardStalled
from pretrain.data.urls import open_shard

SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
COMPRESSED_SUFFIXES = SUFFIXES[1:]
_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
# tar_members' messages that say what is wrong with a shard (samples() files them under a reason)
EMPTY, NOT_A_TAR, BAD_HEADER = "empty file", "not a tar file", "bad tar header"


def samples(url: str, start: int = 0, timeout: float | None = None, columns=None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard from position ``start``.
    (``columns``, the image and label columns a user named, are Parquet's: a tar's files are named by
    their extensions.)

    A tar cannot be entered in the middle: the samples before ``start`` are read (not kept). A shard
    that is empty, not a tar, corrupt, truncated, vanished or (``pipe:``) silent for ``timeout``
    seconds raises BrokenShard after the samples read before the problem.
    """
    read = 0
    try:
        with closing(iter_tar_samples(url, timeout=timeout)) as shard:
            for position, sample in enumerate(shard):
                read = position + 1
                if position >= start:
                    yield sample
    except tarfile.ReadError as e:
        reason = {EMPTY: "empty_shard", NOT_A_TAR: "unreadable_shard"}.get(str(e), "truncated_shard")
        if str(e).startswith(BAD_HEADER):
            reason = "corrupt_shard"
        raise BrokenShard(reason, str(e)) from e
    except ShardStalled as e:
        raise BrokenShard("stalled_shard", str(e)) from e
    except (OSError, tarfile.TarError) as e:
        raise BrokenShard("unreadable_shard", str(e)) from e
    if read == 0:
        raise BrokenShard("empty_shard", "no samples")


def iter_tar_samples(url: str, stream: IO[bytes] | None = None, timeout: float | None = None) -> Iterator[dict]:
    """Samples of one shard as dicts ``{"__key__", "__url__", ext: bytes, ...}``, in tar order.

    Files are grouped by their name up to the first dot after the last slash, as WebDataset does.
    A truncated or corrupt tar raises ``tarfile.TarError`` after the samples read so far; a
    ``pipe:`` shard silent for ``timeout`` seconds raises ShardStalled.
    """
    stream = stream if stream is not None else open_shard(url, timeout)
    try:
        current: dict | None = None
        members = _tarfile_members(stream) if url.endswith(COMPRESSED_SUFFIXES) else tar_members(stream)
        for name, data in members:
            directory, _, base = name.rpartition("/")
            key, dot, ext = base.partition(".")
            if not dot or key.startswith("__"):
                continue
            key = f"{directory}/{key}" if directory else key
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = data
        if current is not None:
            yield current
    finally:
        stream.close()


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of an uncompressed tar stream: ustar, GNU and pax names.

    A lean reader: Python's ``tarfile`` costs about 50 us per member in a stream, a third of the
    work of a small sample besides its decoding. Errors are ``tarfile.ReadError``, as tarfile's.
    """
    long_name: str | None = None
    offset = 0
    while True:
        header = stream.read(_BLOCK)
        if not header:
            if offset == 0:
                raise tarfile.ReadError(EMPTY)
            return  # ends without end-of-archive blocks: tolerated, as tarfile does
        if len(header) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        if header.count(0) == _BLOCK:
            return  # end of archive
        try:  # a header's numbers are octal text: anything else is a corrupt header, not a crash
            stored = int(header[148:156].rstrip(b" \0") or b"-1", 8)
            size = _number(header[124:136])
        except ValueError:
            stored = size = -1
        unsigned = sum(header[:148]) + 256 + sum(header[156:])
        if stored != unsigned or size < 0:
            raise tarfile.ReadError(f"{BAD_HEADER} at byte {offset}" if offset else NOT_A_TAR)
        data = stream.read(size)
        padding = -size % _BLOCK
        if len(data) < size or len(stream.read(padding)) < padding:
            raise tarfile.ReadError("unexpected end of data")
        offset += _BLOCK + size + padding
        kind = header[156:157]
        if kind == b"L":  # GNU long name: the next member's name
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header: its path overrides the next member's name
            long_name = _pax_path(data) or long_name
            continue
        if kind in _REGULAR:
            name = long_name or _ustar_name(header)
            yield name, data
        long_name = None


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b" \0")
    return int(digits, 8) if digits else 0


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(records: bytes) -> str | None:
    position = 0
    while position < len(records):
        length, _, rest = records[position:position + 32].partition(b" ")
        if not length.isdigit():
            break
        record = records[position:position + int(length)]
        key, _, value = record[len(length) + 1:].rstrip(b"\n").partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        position += int(length)
    return None


def _tarfile_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isreg():
                yield member.name, tar.extractfile(member).read()


def shard_bytes(samples: list[dict], classes: list[str] | None = None) -> bytes:
    """A tar shard in memory from ``[{"__key__": k, ext: bytes, ...}]`` (used by the writer and tests);
    ``classes`` is not written (the index names them, and each sample's ``json`` its own)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
