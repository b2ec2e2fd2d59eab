"""Image sets as the Hugging Face Hub ships them, read in place: no ``index.json`` needed.

- A dataset repo on disk (a ``snapshot_download`` copy): its ``.parquet`` or ``.tar`` files anywhere
  below it, each in the split its path names (``data/train-00000-of-00042.parquet``,
  ``default/validation/0000.parquet``, ``imagenet22k-train-0123.tar``; SPLIT_WORDS).
- Parquet files anywhere (a repo, a brace pattern, ``hf://`` URLs): samples per file from their
  footers (a few kB each, read without the rows), class names from the ``datasets`` ClassLabel in
  their schema metadata, which must be the same in every file.
Tar shards carry no counts: a run over them is split by whole shards, and takes the sample and
class counts from ``data.train_samples`` and ``data.num_classes``.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pretrain.data import readers
from pretrain.data.readers.parquet import Columns, footer
from pretrain.data.remote import is_remote
from pretrain.data.shards import BrokenShard, ShardError, ShardSet, is_local, missing_shards

# The words of a file's path that say its split; the first found (from the repo down) decides.
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "val", "val": "val", "valid": "val",
               "test": "test"}
_WORD = re.compile(r"[^/_.\-]+")
FOOTER_THREADS = 16  # remote footers read at once at start-up
_SHARD_SUFFIXES = tuple(s for f in readers.FORMATS.values() for s in f.SUFFIXES)


def split_of(relative: str) -> str | None:
    """The split (``train``, ``val``, ``test``) a shard's path inside its repo names, or None."""
    return next((SPLIT_WORDS[w] for w in _WORD.findall(relative.lower()) if w in SPLIT_WORDS), None)


def repo_shards(directory: Path) -> list[Path]:
    """The shards below a repo directory, in name order; hidden folders (``.cache``) are not the set's."""
    found = [p for p in directory.rglob("*") if p.name.endswith(_SHARD_SUFFIXES) and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(directory).parts)]
    return sorted(found, key=lambda p: str(p.relative_to(directory)))


def resolve_repo(directory: Path, split: str, columns: Columns = Columns()) -> ShardSet:
    """The shards of ``split`` (``train`` or ``val``) in a repo directory; ShardError when it has none."""
    shards = repo_shards(directory)
    if not shards:
        raise ShardError(f"{directory} is a directory without index.json and without .parquet or .tar shards: "
                         f"write it with `python -m pretrain.data.write` or name its shards with a brace pattern")
    splits: dict[str | None, list[str]] = {}
    for path in shards:
        splits.setdefault(split_of(str(path.relative_to(directory))), []).append(str(path))
    if set(splits) == {None}:  # no split in any name: the whole directory is the set
        splits = {split: splits[None]}
    if split not in splits:
        named = sorted(s for s in splits if s)
        raise ShardError(f"{directory}: no {split!r} split among its {len(shards)} shards (their names say: "
                         f"{named}; a shard is in the split its path names: {', '.join(sorted(SPLIT_WORDS))})")
    return described(splits[split], columns)


def described(urls: list[str], columns: Columns = Columns(), timeout: float | None = None) -> ShardSet:
    """``urls`` with the counts and class names of their Parquet footers when every one is Parquet
    and can be read in parts (local or fsspec such as ``hf://``, not ``pipe:`` or ``http(s)://``);
    else as they are (and with missing local files as they are: the run lists those). ``timeout``:
    seconds a remote request may take (``data.shard_timeout``)."""
    if not urls or missing_shards(urls) or not all(readers.format_of(u) == "parquet" and (is_local(u) or is_remote(u))
                                                   for u in urls):
        return ShardSet(urls)
    counts, classes, labels, first = [], None, "class", None
    for url, (rows, found) in zip(urls, _footers(urls, columns, timeout)):
        counts.append(rows)
        if found.classes is not None:
            if classes is not None and found.classes != classes:
                raise ShardError(f"the ClassLabel names of {url} ({_few(found.classes)}) differ from those of "
                                 f"{first} ({_few(classes)}): the same label would mean different classes")
            classes, first = classes or found.classes, first or url
        if found.multi_label:
            labels = "multi"
        elif found.label is None and labels == "class":
            labels = None
    return ShardSet(urls, samples=sum(counts), classes=classes, counts=counts, labels=labels)


def _footers(urls: list[str], columns: Columns, timeout: float | None) -> list:
    """(rows, layout) of every file; remote ones read FOOTER_THREADS at a time, so that their round
    trips overlap (a few hundred files start in seconds, not minutes)."""
    def one(url: str):
        try:
            return footer(url, columns, timeout)
        except BrokenShard as e:
            raise ShardError(f"{url}: {e} (find the broken shards with `python -m pretrain.data.check`)") from None

    if all(is_local(u) for u in urls):
        return [one(u) for u in urls]
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return list(pool.map(one, urls))


def _few(names: list[str]) -> str:
    return f"{len(names)} classes: {names[:4]}" + (" ..." if len(names) > 4 else "")
