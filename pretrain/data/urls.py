"""Shard URLs by their scheme: the URLs a pattern or list names (:func:`expand`), and one shard's
bytes (:func:`open_shard`): a local path, a ``pipe:`` command, ``http(s)://`` (webdataset's gopen), or
any fsspec URL whose backend is installed (``hf://`` with huggingface_hub, ``s3://`` ...;
:mod:`pretrain.data.remote`).

Below the readers, which open their shards here, and above :mod:`pretrain.data.remote`.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
from typing import IO

import braceexpand

from pretrain.data import remote
from pretrain.data.shards import ShardError, ShardStalled, is_local


def expand(source: str | list[str]) -> list[str]:
    """The shard URLs a brace pattern or list names, remote glob patterns (``hf://.../train-*.parquet``)
    expanded; ShardError when there are none, or when a remote URL's fsspec backend is not installed."""
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
    return remote.open_stream(url, timeout)
