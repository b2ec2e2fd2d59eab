"""One reader per shard format, chosen by the shard's name: ``.parquet`` is Parquet, anything else tar.

A format is a module here with
- ``SUFFIXES``: the file name endings it is chosen by;
- ``samples(url, start=0, timeout=None, columns=Columns())``: the shard's raw samples ``{"__key__",
  "__url__", ext: bytes, ...}`` in shard order from position ``start``, raising
  :class:`~pretrain.data.shards.BrokenShard` (with the counter it is filed under) after the samples
  read before a problem; ``columns`` (:class:`~pretrain.data.readers.parquet.Columns`) names the
  image and label columns of a format that has columns;
- ``shard_bytes(samples, classes=None)``: a shard in memory, for ``pretrain.data.write --format`` and
  the tests (``classes``: the class names, for a format that stores them).

The stream (:mod:`pretrain.data.dataset`) splits, shuffles and resumes the samples of every format
alike; a new format is a module here and its name in FORMATS.
"""

from __future__ import annotations

import re
from types import ModuleType

from pretrain.data.readers import parquet, tar

FORMATS: dict[str, ModuleType] = {"tar": tar, "parquet": parquet}
DEFAULT = "tar"  # WebDataset shards may be named anything (and pipe: commands end in "-")

# A format's suffix at the end of a name: of a path, before a URL's query, inside a pipe: command.
_SUFFIX = re.compile("(" + "|".join(re.escape(s) for f in FORMATS.values() for s in f.SUFFIXES) + r")(?![\w.])")


def format_of(url: str) -> str:
    """The name of the format of the shard ``url`` names: the last known suffix in it decides."""
    found = _SUFFIX.findall(url)
    if found:
        return next(name for name, module in FORMATS.items() if found[-1] in module.SUFFIXES)
    return DEFAULT


def reader_for(url: str) -> ModuleType:
    return FORMATS[format_of(url)]
