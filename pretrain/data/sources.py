"""What a source (``data.train`` / ``data.val``) names, as a :class:`~pretrain.data.shards.ShardSet`.

A source is one of:
- a directory written by ``pretrain.data.write`` (its ``index.json`` names shards, counts and classes);
- a directory without an index (a Hub dataset repo on disk) or Parquet files anywhere, described by
  their names and footers (:mod:`pretrain.data.hub`);
- a brace pattern (``/data/in21k/train-{000000..001023}.tar``);
- a list of paths or URLs (``pipe:`` commands, ``http(s)://``, or any fsspec URL whose backend is installed:
  ``hf://`` with huggingface_hub, ``s3://`` ...; glob patterns in those are expanded, :mod:`pretrain.data.urls`).

The top of the data layers: it reads footers through the hub and the readers, which sit below it.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.data import hub
from pretrain.data.readers.parquet import Columns
from pretrain.data.shards import INDEX_NAME, ShardSet, is_local, read_index
from pretrain.data.urls import expand


def resolve(source: str | list[str], split: str, columns=None, timeout: float | None = None) -> ShardSet:
    """The shards a source names; for a writer directory, those of ``split`` (``train`` or ``val``),
    or of its only split (a validation folder written on its own); for a directory without an index
    (a Hub dataset repo) or Parquet files, with what their names and footers say
    (:mod:`pretrain.data.hub`; ``columns``: the Parquet columns a user named; ``timeout``: seconds a
    remote request for a footer may take, ``data.shard_timeout``)."""
    columns = columns or Columns()
    if isinstance(source, str) and is_local(source) and Path(source).expanduser().is_dir():
        directory = Path(source).expanduser()
        if (directory / INDEX_NAME).exists():
            return read_index(directory, split)
        return hub.resolve_repo(directory, split, columns)
    return hub.described(expand(source), columns, timeout)
