"""The Parquet format: a shard is one ``.parquet`` file, one row per sample, as LAION-style sets come.

Columns: ``__key__`` (string, the sample's key; a null one becomes ``SHARD_NAME/ROW``) and one column per extension (``jpg``, ``png``,
``webp``, ``cls``, ``json``, ...), whose value is that file's bytes; a null means the sample has no
such file. The writer stores every extension as a binary column (``cls`` as decimal text, as in a
tar); the reader also takes string columns (their UTF-8 bytes) and integer columns (as decimal text,
so an int ``cls`` is a label) and ignores columns of other types.

Row groups are the unit of reading: a reader starting at position ``start`` reads the row group
holding it and those after, never the ones before. Page checksums are written and verified, so
flipped bytes are a ``corrupt_shard``, not a wrong image.
"""

from __future__ import annotations

import io
import os
from typing import Iterator

from pretrain.data.shards import IMAGE_EXTENSIONS, BrokenShard, ShardStalled, is_local, open_shard

SUFFIXES = (".parquet",)
KEY = "__key__"
ROW_GROUP_SAMPLES = 256  # per row group the writer writes: about 15-30 MB of images read at once
_MAGIC = b"PAR1"


def samples(url: str, start: int = 0, timeout: float | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard from position ``start``.

    A file that is empty, not Parquet, cut short (its footer lost), without a ``__key__`` column,
    or whose pages fail their checksum or do not decode raises BrokenShard, after the samples of
    the row groups read before the problem. A ``pipe:`` or remote shard is read whole first
    (Parquet's index is at its end); one silent for ``timeout`` seconds is a ``stalled_shard``.
    """
    import pyarrow as pa

    try:
        shard, columns = _open(url, timeout)
        if shard.metadata.num_rows == 0:
            raise BrokenShard("empty_shard", "no samples")
        first = 0  # the position of the row group's first row
        for group in range(shard.num_row_groups):
            rows = shard.metadata.row_group(group).num_rows
            if first + rows > start:
                table = shard.read_row_group(group, columns=[KEY, *columns], use_threads=False)
                keys = table.column(KEY).to_pylist()
                values = {ext: table.column(ext).to_pylist() for ext in columns}
                del table
                for row in range(max(start - first, 0), rows):
                    key = keys[row] if keys[row] is not None else f"{os.path.basename(url)}/{first + row}"
                    sample = {"__key__": key, "__url__": url}
                    for ext, column in values.items():
                        if column[row] is not None:
                            sample[ext] = _as_bytes(column[row])
                    yield sample
            first += rows
    except ShardStalled as e:
        raise BrokenShard("stalled_shard", str(e)) from e
    except (OSError, pa.ArrowException) as e:  # a page that fails its checksum or does not decode
        raise BrokenShard("corrupt_shard", str(e)) from e


def _open(url: str, timeout: float | None):
    """(the ParquetFile, the extension columns it holds); BrokenShard if it cannot be opened."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if is_local(url):
            source = url
            size = os.path.getsize(url)
        else:
            with open_shard(url, timeout) as stream:
                source = pa.BufferReader(stream.read())
            size = source.size()
    except ShardStalled:
        raise
    except OSError as e:
        raise BrokenShard("unreadable_shard", str(e)) from e
    if size == 0:
        raise BrokenShard("empty_shard", "empty file")
    try:
        shard = pq.ParquetFile(source, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise BrokenShard(*_damage(source, size, e)) from e
    names = shard.schema_arrow.names
    if KEY not in names:
        raise BrokenShard("unreadable_shard", f"no {KEY!r} column (columns: {names})")
    columns = [field.name for field in shard.schema_arrow
               if not field.name.startswith("__") and _readable(field.type)]
    return shard, columns


def _damage(source, size: int, error: Exception) -> tuple[str, str]:
    """(reason, message) for a file whose footer could not be read: where its magic bytes are
    tells a file cut short from one that is not Parquet at all."""
    if isinstance(source, str):
        with open(source, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
    else:
        head, tail = source.read_at(4, 0), source.read_at(4, max(size - 4, 0))
    if head != _MAGIC:
        return "unreadable_shard", f"not a Parquet file ({error})"
    if tail != _MAGIC:
        return "truncated_shard", f"cut short: no Parquet footer after {size} bytes ({error})"
    return "corrupt_shard", f"unreadable Parquet footer ({error})"


def _readable(kind) -> bool:
    import pyarrow as pa

    t = pa.types
    if t.is_dictionary(kind):
        kind = kind.value_type
    return (t.is_binary(kind) or t.is_large_binary(kind) or t.is_fixed_size_binary(kind) or t.is_string(kind)
            or t.is_large_string(kind) or t.is_integer(kind)
            or getattr(t, "is_binary_view", lambda _: False)(kind) or getattr(t, "is_string_view", lambda _: False)(kind))


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()  # an integer column: decimal text, as a tar's .cls


def shard_bytes(samples: list[dict], row_group: int = ROW_GROUP_SAMPLES) -> bytes:
    """A Parquet shard in memory from ``[{"__key__": k, ext: bytes, ...}]`` (the writer's and the tests').

    Image columns are stored uncompressed (their bytes are compressed already), the others with
    snappy; every page carries a checksum.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    extensions = sorted({ext for sample in samples for ext in sample if not ext.startswith("__")})
    table = pa.table({KEY: pa.array([s["__key__"] for s in samples], pa.string()),
                      **{ext: pa.array([s.get(ext) for s in samples], pa.binary()) for ext in extensions}})
    compression = {name: "NONE" if name in IMAGE_EXTENSIONS else "SNAPPY" for name in table.column_names}
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=max(row_group, 1), compression=compression, use_dictionary=False,
                   write_page_checksum=True)
    return out.getvalue()
