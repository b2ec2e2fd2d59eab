"""The Parquet format: a shard is one ``.parquet`` file, one row per sample, as vitscale's writer,
LAION-style tools and the Hugging Face ``datasets`` library write them.

Which columns make a sample (:func:`layout`, from the file's schema alone):
- the key: ``__key__`` (string); without that column, or where it is null, ``SHARD_NAME/ROW``;
- the image: a binary column ``jpg``, ``png``, ``webp`` or ``jpeg`` (vitscale's writer, LAION) is
  a file under its own name; otherwise the first of IMAGE_COLUMNS that exists (or ``data.image_column``,
  which may name a field of a struct as ``outer.inner``), binary or the ``datasets`` Image struct
  ``{bytes, path}``, becomes a file under the extension its bytes say (``jpg``, ``png``, ``webp``;
  ``image`` for other formats);
- the label: ``cls``, else the first of LABEL_COLUMNS (or ``data.label_column``), an integer column
  read as ``cls`` (decimal text, as in a tar); the class names come from the ``datasets`` ClassLabel
  in the file's ``huggingface`` schema metadata. A list column (multi-label) is no ``cls``;
- every other column whose name does not start with ``__`` and whose type is binary, string or
  integer is a file under its name (a caption ``txt``, a ``json``); other types are ignored.
A file without an image column is refused, naming its columns; an image stored as a path only
(its bytes not in the file) is refused, naming the row and the path.

Row groups are the unit of reading: a reader starting at position ``start`` reads the row group
holding it and those after, never the ones before (from a remote file, by range requests). Page
checksums are written and verified, so flipped bytes are a ``corrupt_shard``, not a wrong image.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

from pretrain.data import remote
from pretrain.data.shards import IMAGE_EXTENSIONS, BrokenShard, ShardStalled, is_local
from pretrain.data.urls import open_shard

SUFFIXES = (".parquet",)
KEY = "__key__"
ROW_GROUP_SAMPLES = 256  # per row group the writer writes: about 15-30 MB of images read at once
# Where sets from the Hub keep the image and the label, in the order they are looked for.
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "jpeg")
LABEL_COLUMNS = ("label", "labels", "cls", "fine_label", "target", "class", "coarse_label")
OTHER_IMAGE = "image"  # the file a Hub image of another format than JPEG, PNG, WebP is read as
_MAGIC = b"PAR1"
_IMAGE_MAGIC = ((b"\xff\xd8", 0, "jpg"), (b"\x89PNG", 0, "png"), (b"WEBP", 8, "webp"))


@dataclass(frozen=True)
class Columns:
    """The image and label columns a user named (``data.image_column``, ``data.label_column``)."""

    image: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Layout:
    """How one file's columns make samples; from its schema alone (:func:`layout`)."""

    files: tuple[str, ...]  # columns read as a file under their own name
    image: str | None = None  # a dotted path to the image's bytes, read as a file named by its magic bytes
    image_path: str | None = None  # a dotted path to the datasets Image struct's ``path`` (for the message)
    label: str | None = None  # the integer column read as ``cls``
    multi_label: bool = False  # the label column holds lists: no ``cls``
    classes: list[str] | None = None  # the label's ClassLabel names, from the schema metadata
    key: bool = True  # the file has a ``__key__`` column

    @property
    def labels(self) -> str | None:
        """``class`` (a class index per sample), ``multi`` (a list of them) or None (no label column)."""
        if self.multi_label:
            return "multi"
        return "class" if self.label is not None or "cls" in self.files else None

    @property
    def columns(self) -> list[str]:
        """The top-level columns to read."""
        wanted = ([KEY] if self.key else []) + list(self.files)
        for path in (self.image, self.label):
            if path is not None and path.split(".")[0] not in wanted:
                wanted.append(path.split(".")[0])
        return wanted


def layout(schema, columns: Columns = Columns(), name: str = "") -> Layout:
    """The layout of a file with the arrow ``schema``; BrokenShard naming its columns when it has no
    image column, or not the ones ``columns`` names. ``name`` names the file in messages."""
    import pyarrow as pa

    names = schema.names
    features = _features(schema)
    image = columns.image
    if image is not None:
        if _field(schema, image) is None:
            raise BrokenShard("unreadable_shard", f"{name}: no column {image!r} (data.image_column; columns: {names})")
    elif not any(n in names and _is_binary(schema.field(n).type) for n in IMAGE_EXTENSIONS):
        image = next((n for n in IMAGE_COLUMNS if n in names), None)
        if image is None:
            raise BrokenShard("unreadable_shard", f"{name}: no image column (looked for {', '.join(IMAGE_COLUMNS)}; "
                                                  f"columns: {names}): name it with data.image_column")
    image_path = None
    if image is not None:
        kind = _field(schema, image).type
        if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            if kind.get_field_index("path") >= 0:
                image_path = f"{image}.path"
            image = f"{image}.bytes"  # the datasets Image struct {bytes, path}
        elif not _is_binary(kind):
            raise BrokenShard("unreadable_shard", f"{name}: the image column {image!r} holds {kind}, not image "
                                                  f"bytes or a {{bytes, path}} struct (columns: {names})")
    label = columns.label
    if label is not None and label not in names:
        raise BrokenShard("unreadable_shard", f"{name}: no column {label!r} (data.label_column; columns: {names})")
    if label is None:
        label = next((n for n in LABEL_COLUMNS if n in names), None)
    multi_label = label is not None and _is_list(schema.field(label).type)
    if label is not None and not pa.types.is_integer(schema.field(label).type):
        label = None  # a list (multi-label), or text: a text ``cls`` stays a file, as in a tar
    taken = {p.split(".")[0] for p in (image, label) if p is not None}
    files = tuple(f.name for f in schema if not f.name.startswith("__") and f.name not in taken and _readable(f.type))
    return Layout(files, image, image_path, label, multi_label, _class_names(features, label), KEY in names)


def samples(url: str, start: int = 0, timeout: float | None = None, columns: Columns = Columns()) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard from position ``start``.

    A file that is empty, not Parquet, cut short (its footer lost), without an image column, with
    an image stored as a path only, or whose pages fail their checksum or do not decode raises
    BrokenShard, after the samples of the row groups read before the problem. A remote shard
    (``hf://``, ``s3://`` ...) is read by range requests, its footer then its row groups; a ``pipe:``
    or ``http(s)://`` one is read whole first (Parquet's index is at its end); one whose command or
    request sends nothing for ``timeout`` seconds is a ``stalled_shard``.
    """
    import pyarrow as pa

    try:
        shard = _open(url, timeout)
        if shard.metadata.num_rows == 0:
            raise BrokenShard("empty_shard", "no samples")
        found = layout(shard.schema_arrow, columns, os.path.basename(url))
        first = 0  # the position of the row group's first row
        for group in range(shard.num_row_groups):
            rows = shard.metadata.row_group(group).num_rows
            if first + rows > start:
                table = shard.read_row_group(group, columns=found.columns, use_threads=False)
                keys = table.column(KEY).to_pylist() if found.key else [None] * rows
                values = {ext: table.column(ext).to_pylist() for ext in found.files}
                images = _column(table, found.image) if found.image else None
                paths = _column(table, found.image_path) if found.image_path else None
                labels = table.column(found.label).to_pylist() if found.label else None
                del table
                for row in range(max(start - first, 0), rows):
                    key = keys[row] if keys[row] is not None else f"{os.path.basename(url)}/{first + row}"
                    sample = {"__key__": key, "__url__": url}
                    for ext, column in values.items():
                        if column[row] is not None:
                            sample[ext] = _as_bytes(column[row])
                    if images is not None and images[row] is not None:
                        sample[image_extension(images[row])] = images[row]
                    elif paths is not None and paths[row] is not None:
                        raise BrokenShard("unreadable_shard", f"{url}: row {first + row}: the image column "
                                          f"{found.image.rpartition('.')[0]!r} holds only a path "
                                          f"({paths[row]!r}); the bytes are not in the file. Write it with the "
                                          f"images embedded: datasets' push_to_hub does, or, before to_parquet, "
                                          f"ds.with_format('arrow').map(datasets.table.embed_table_storage, "
                                          f"batched=True)")
                    if labels is not None and labels[row] is not None:
                        sample["cls"] = _as_bytes(labels[row])
                    yield sample
            first += rows
    except ShardStalled as e:
        raise BrokenShard("stalled_shard", str(e)) from e
    except (OSError, pa.ArrowException) as e:  # a page that fails its checksum or does not decode
        raise BrokenShard("corrupt_shard", str(e)) from e


def footer(url: str, columns: Columns = Columns(), timeout: float | None = None) -> tuple[int, Layout]:
    """(rows, layout) of a shard from its footer alone (its rows are not read); BrokenShard as
    :func:`samples` raises it."""
    import pyarrow as pa

    try:
        shard = _open(url, timeout)
        return shard.metadata.num_rows, layout(shard.schema_arrow, columns, os.path.basename(url))
    except ShardStalled as e:
        raise BrokenShard("stalled_shard", str(e)) from e
    except (OSError, pa.ArrowException) as e:
        raise BrokenShard("corrupt_shard", str(e)) from e


def image_extension(data: bytes) -> str:
    """The extension an image's bytes are read under: their format's, by its magic bytes."""
    for magic, offset, ext in _IMAGE_MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return ext
    return OTHER_IMAGE


def _column(table, path: str) -> list:
    """The values at the dotted ``path`` (a column, or a field of struct columns) of ``table``."""
    import pyarrow.compute as pc

    top, *fields = path.split(".")
    values = table.column(top)
    for name in fields:
        values = pc.struct_field(values, name)
    return values.to_pylist()


def _field(schema, path: str):
    """The arrow field at a dotted ``path`` of ``schema`` (into structs), or None."""
    import pyarrow as pa

    top, *fields = path.split(".")
    if top not in schema.names:
        return None
    found = schema.field(top)
    for name in fields:
        if not pa.types.is_struct(found.type) or found.type.get_field_index(name) < 0:
            return None
        found = found.type.field(name)
    return found


def _features(schema) -> dict:
    """The ``datasets`` features the file's ``huggingface`` schema metadata declares ({} if none)."""
    try:
        return json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features") or {}
    except (ValueError, AttributeError):
        return {}


def _class_names(features: dict, label: str | None) -> list[str] | None:
    feature = features.get(label) if label else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return list(feature["names"])
    return None


def _open(url: str, timeout: float | None):
    """The ParquetFile; BrokenShard if it cannot be opened. A local file and a remote one (fsspec:
    ``hf://``, ``s3://`` ...) are read in parts, the footer first, then the row groups asked for
    (remote: by range requests); a ``pipe:`` or ``http(s)://`` shard is read whole first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if is_local(url):
            source = url
            size = os.path.getsize(url)
        elif remote.is_remote(url):
            source = remote.RangeFile(url, timeout)
            size = source.size
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
        # pre_buffer: a row group's column chunks are fetched in as few (coalesced) requests as can be
        return pq.ParquetFile(source, page_checksum_verification=True, pre_buffer=not is_local(url))
    except ShardStalled:
        raise
    except (OSError, pa.ArrowException) as e:
        raise BrokenShard(*_damage(source, size, e)) from e


def _damage(source, size: int, error: Exception) -> tuple[str, str]:
    """(reason, message) for a file whose footer could not be read: where its magic bytes are
    tells a file cut short from one that is not Parquet at all."""
    with open(source, "rb") if isinstance(source, str) else nullcontext(source) as f:
        f.seek(0)
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if head != _MAGIC:
        return "unreadable_shard", f"not a Parquet file ({error})"
    if tail != _MAGIC:
        return "truncated_shard", f"cut short: no Parquet footer after {size} bytes ({error})"
    return "corrupt_shard", f"unreadable Parquet footer ({error})"


def _readable(kind) -> bool:
    """Binary, string and integer columns are files of a sample; other types are ignored."""
    import pyarrow as pa

    t = pa.types
    if t.is_dictionary(kind):
        kind = kind.value_type
    return (_is_binary(kind) or t.is_string(kind) or t.is_large_string(kind) or t.is_integer(kind)
            or getattr(t, "is_string_view", lambda _: False)(kind))


def _is_binary(kind) -> bool:
    import pyarrow as pa

    t = pa.types
    return (t.is_binary(kind) or t.is_large_binary(kind) or t.is_fixed_size_binary(kind)
            or getattr(t, "is_binary_view", lambda _: False)(kind))


def _is_list(kind) -> bool:
    import pyarrow as pa

    t = pa.types
    return t.is_list(kind) or t.is_large_list(kind) or t.is_fixed_size_list(kind)


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()  # an integer column: decimal text, as a tar's .cls


HUB_IMAGE, HUB_LABEL = "image", "label"  # where the writer puts them, as the datasets library does
_IMAGE_STRUCT = (("bytes", "binary"), ("path", "string"))  # the datasets Image feature's storage


def shard_bytes(samples: list[dict], row_group: int = ROW_GROUP_SAMPLES, classes: list[str] | None = None) -> bytes:
    """A Parquet shard in memory from ``[{"__key__": k, ext: bytes, ...}]`` (the writer's and the tests').

    Samples that each hold one image (``jpg``, ``png`` or ``webp``) and a class number (``cls``, or
    none) are written as the ``datasets`` library writes an image set, so that
    ``load_dataset("parquet", ...)`` decodes them: ``__key__``, the image as the Image struct
    ``{bytes, path}`` in ``image``, the class in the integer column ``label`` (a ClassLabel with
    ``classes`` as its names, if given), every other file (``json``) a binary column under its
    name, and those features in the ``huggingface`` schema metadata. Samples that layout cannot
    hold (an image under another name, two images, a label that is no class number: the tests'
    broken samples) are written one binary column per extension, as vitscale wrote every Parquet
    shard before; the reader reads both. Images are stored uncompressed (their bytes are compressed
    already), the other columns with snappy; every page carries a checksum.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    extensions = sorted({ext for sample in samples for ext in sample if not ext.startswith("__")})
    if _fits_hub_layout(samples):
        table, features = _hub_table(samples, extensions, classes)
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        compression = {name: "SNAPPY" for name in table.column_names if name != HUB_IMAGE}
        compression.update({f"{HUB_IMAGE}.bytes": "NONE", f"{HUB_IMAGE}.path": "SNAPPY"})
    else:
        table = pa.table({KEY: pa.array([s["__key__"] for s in samples], pa.string()),
                          **{ext: pa.array([s.get(ext) for s in samples], pa.binary()) for ext in extensions}})
        compression = {name: "NONE" if name in IMAGE_EXTENSIONS else "SNAPPY" for name in table.column_names}
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=max(row_group, 1), compression=compression, use_dictionary=False,
                   write_page_checksum=True)
    return out.getvalue()


def _fits_hub_layout(samples: list[dict]) -> bool:
    """Each sample one image under ``jpg``/``png``/``webp`` and a class number or none; no file
    named like the layout's own columns."""
    for sample in samples:
        if sum(ext in sample for ext in IMAGE_EXTENSIONS) != 1 or not any(e in sample for e in ("jpg", "png", "webp")):
            return False
        if HUB_IMAGE in sample or HUB_LABEL in sample or not (sample.get("cls") is None or sample["cls"].isdigit()):
            return False
    return bool(samples)


def _hub_table(samples: list[dict], extensions: list[str], classes: list[str] | None):
    """(arrow table, datasets features) of samples that fit the Hub layout."""
    import pyarrow as pa

    images = [next(sample[e] for e in IMAGE_EXTENSIONS if e in sample) for sample in samples]
    labels = [int(sample["cls"]) if sample.get("cls") is not None else None for sample in samples]
    others = [e for e in extensions if e not in IMAGE_EXTENSIONS and e != "cls"]
    image_type = pa.struct([(name, getattr(pa, kind)()) for name, kind in _IMAGE_STRUCT])
    table = pa.table({KEY: pa.array([s["__key__"] for s in samples], pa.string()),
                      HUB_IMAGE: pa.array([{"bytes": data, "path": None} for data in images], image_type),
                      HUB_LABEL: pa.array(labels, pa.int64()),
                      **{ext: pa.array([s.get(ext) for s in samples], pa.binary()) for ext in others}})
    label = {"names": list(classes), "_type": "ClassLabel"} if classes else {"dtype": "int64", "_type": "Value"}
    features = {KEY: {"dtype": "string", "_type": "Value"}, HUB_IMAGE: {"_type": "Image"}, HUB_LABEL: label,
                **{ext: {"dtype": "binary", "_type": "Value"} for ext in others}}
    return table, features
