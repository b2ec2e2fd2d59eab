"""Shards on fsspec file systems: ``hf://`` (the Hugging Face Hub, through huggingface_hub), ``s3://``,
``gs://`` and any other backend installed.

- :func:`filesystem`: the file system a URL names; a backend that is not installed is a ShardError
  naming the package to install (``pip install 'vitscale[hub]'`` for ``hf://``).
- :func:`expand_glob`: ``hf://datasets/ORG/NAME/data/train-*.parquet`` -> the files it matches.
- :class:`RangeFile`: a remote file read by range requests (Parquet reads its footer, then the row
  groups it needs; a tar is streamed in STREAM_BLOCK requests), each of which must return within
  ``data.shard_timeout`` seconds or the read raises ShardStalled.

Gated sets need a token: huggingface_hub reads ``HF_TOKEN`` (or the one ``hf auth login`` stored)
itself; vitscale never sees it.
"""

from __future__ import annotations

import io
import threading
from typing import Callable

from pretrain.data.shards import ShardError, ShardStalled

GLOB_CHARS = "*?["
STREAM_BLOCK = 8 << 20  # bytes per request when a shard is streamed from start to end (a tar)
# The package each protocol's fsspec backend comes in, and how to install it.
BACKENDS = {"hf": ("huggingface_hub", "pip install 'vitscale[hub]'"), "s3": ("s3fs", "pip install s3fs"),
            "gs": ("gcsfs", "pip install gcsfs"), "gcs": ("gcsfs", "pip install gcsfs")}


def is_remote(url: str) -> bool:
    """A URL read through fsspec: not a local path, not ``pipe:``, not ``http(s)://`` (webdataset's gopen)."""
    return "://" in url and not url.startswith(("pipe:", "http://", "https://"))


def filesystem(url: str):
    """(fsspec file system, path inside it) of ``url``; ShardError when its backend is missing."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        package, install = BACKENDS.get(protocol, (None, None))
        needs = f"{package}, which is not installed: {install}" if package else f"a backend that is not installed ({e})"
        raise ShardError(f"{url}: reading {protocol}:// URLs needs {needs}") from None
    except ValueError as e:  # fsspec: "Protocol not known"
        raise ShardError(f"{url}: {e}") from None


def has_glob(url: str) -> bool:
    return any(c in url.split("://", 1)[-1] for c in GLOB_CHARS)


def expand_glob(url: str) -> list[str]:
    """The files a remote glob pattern matches, in name order; ShardError when none does."""
    fs, path = filesystem(url)
    found = sorted(fs.glob(path))
    if not found:
        raise ShardError(f"{url}: no files match")
    return [fs.unstrip_protocol(p) for p in found]


def _with_deadline(call: Callable, timeout: float | None, url: str):
    """``call()``, or ShardStalled once it has not returned for ``timeout`` seconds. The call runs in
    a daemon thread: a request that hangs cannot be cancelled, but it is left behind, never waited for."""
    if timeout is None:
        return call()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="shard-request")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ShardStalled(f"{url}: a request sent nothing back for {timeout:g} s (data.shard_timeout)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class RangeFile(io.RawIOBase):
    """A remote file, read by range requests (no cache: each ``read`` is one request for exactly its
    bytes, so Parquet fetches its footer and the row groups it reads, nothing else). Opening it and
    every read raise ShardStalled when a request does not return within ``timeout`` seconds."""

    def __init__(self, url: str, timeout: float | None = None) -> None:
        super().__init__()
        self.url, self.timeout = url, timeout
        fs, path = filesystem(url)
        self.file = _with_deadline(lambda: fs.open(path, "rb", cache_type="none"), timeout, url)
        self.size = self.file.size
        self.stalled = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def read(self, size: int = -1) -> bytes:
        try:
            return _with_deadline(lambda: self.file.read(size), self.timeout, self.url)
        except ShardStalled:
            self.stalled = True  # the request still holds the file: close() leaves it to that thread
            raise

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and not self.stalled:
            self.file.close()
        super().close()


def open_stream(url: str, timeout: float | None = None) -> io.BufferedReader:
    """A remote shard to read from start to end (a tar): STREAM_BLOCK bytes per request."""
    return io.BufferedReader(RangeFile(url, timeout), buffer_size=STREAM_BLOCK)
