"""What streaming shards from the Hub costs: first-sample latency and bytes read per sample, tar
against Parquet, through a stand-in for huggingface_hub's ``hf://`` file system.

    python -m pretrain.bench remote [--samples 1024] [--image-kb 110] [--row-group 256]
                                    [--latency-ms 50] [--mb-per-s 100]

:class:`LocalHub` serves local files as ``hf://PATH`` the way ``HfFileSystem`` does (range requests
through fsspec's buffered file), adding ``--latency-ms`` per request and a transfer time at
``--mb-per-s``, and counts the requests and bytes asked for. One shard of ``--samples`` samples of
``--image-kb`` kB (random bytes after a JPEG marker: nothing is decoded, only read) is written as a
tar and as Parquet (row groups of ``--row-group`` samples; the ``datasets`` library writes 100 per
group for image sets), then each is read by its reader as a run reads it: from its start, and from its middle (a
share that starts inside the shard). Per row: requests and seconds to the first sample, bytes read
per sample handed out; and what a run's start-up reads of a Parquet shard to count its samples
(its footer). The last line is Parquet's bytes per sample from the middle over tar's.
The tests register the same stand-in (``tests/unit/test_data_hub.py``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem


class LocalHub(AbstractFileSystem):
    """A stand-in for ``HfFileSystem``: ``hf://PATH`` is ``root/PATH``; :meth:`serving` makes one.

    ``requests`` lists every request, ``(path, start, end)`` (``(path, 0, 0)`` for a file's size);
    each waits ``latency`` seconds plus its bytes at ``bandwidth`` bytes/s. A file named in ``stall``
    answers that many range requests, then hangs until ``release`` is set (a stalled connection)."""

    protocol = "hf"
    cachable = False  # fsspec would hand back one instance per class; a fresh one costs nothing
    root: Path
    latency = 0.0
    bandwidth: float | None = None
    requests: list
    stall: dict
    release: threading.Event

    @classmethod
    def serving(cls, root: Path, latency: float = 0.0, bandwidth: float | None = None,
                stall: dict[str, int] | None = None) -> type[LocalHub]:
        """A subclass serving ``root``, with its own counters: register it under ``hf``."""
        return type("LocalHub", (cls,), {"root": Path(root), "latency": latency, "bandwidth": bandwidth,
                                         "requests": [], "stall": dict(stall or {}), "release": threading.Event()})

    def bytes_requested(self, name: str | None = None) -> int:
        return sum(end - start for path, start, end in self.requests if name is None or path.endswith(name))

    def _local(self, path: str) -> Path:
        return self.root / self._strip_protocol(path).lstrip("/")

    def _entry(self, path: str, local: Path) -> dict:
        kind = "directory" if local.is_dir() else "file"
        return {"name": self._strip_protocol(path), "size": local.stat().st_size if kind == "file" else 0, "type": kind}

    def ls(self, path, detail=True, **kwargs):
        local = self._local(path)
        if not local.exists():
            raise FileNotFoundError(path)
        children = [local] if local.is_file() else sorted(local.iterdir())
        entries = [self._entry(str(child.relative_to(self.root)), child) for child in children]
        return entries if detail else [e["name"] for e in entries]

    def info(self, path, **kwargs):
        local = self._local(path)
        if not local.exists():
            raise FileNotFoundError(path)
        self.requests.append((self._strip_protocol(path), 0, 0))  # a metadata request: the file's size
        time.sleep(self.latency)
        return self._entry(path, local)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        return _ServedFile(self, path, mode, block_size or "default", autocommit, cache_options=cache_options,
                           **kwargs)


class _ServedFile(AbstractBufferedFile):
    def _fetch_range(self, start: int, end: int) -> bytes:
        hub = self.fs
        served = sum(1 for path, begin, stop in hub.requests if path == self.path and stop > begin)
        end = min(end, self.size)  # fsspec asks past the end for a read to the end
        hub.requests.append((self.path, start, end))
        if served >= hub.stall.get(Path(self.path).name, served + 1):
            hub.release.wait(60)  # a connection that stalls; the test releases it when done
        time.sleep(hub.latency + ((end - start) / hub.bandwidth if hub.bandwidth else 0.0))
        with open(hub._local(self.path), "rb") as f:
            f.seek(start)
            return f.read(end - start)


def write_shards(directory: Path, samples: int, image_bytes: int, row_group: int) -> dict[str, str]:
    """One shard of each format with the same samples; {format: path inside ``directory``}."""
    from pretrain.data.readers import parquet, tar

    shard = [{"__key__": f"{i:06d}", "jpg": b"\xff\xd8" + os.urandom(image_bytes - 2),
              "cls": str(i % 1000).encode()} for i in range(samples)]
    (directory / "shard.tar").write_bytes(tar.shard_bytes(shard))
    (directory / "shard.parquet").write_bytes(parquet.shard_bytes(shard, row_group=row_group))
    return {"tar": "shard.tar", "parquet": "shard.parquet"}


def read_from(hub: LocalHub, url: str, start: int) -> tuple[int, float, int, int]:
    """(requests, seconds) to the first sample from ``start``, then (bytes, samples) for the rest."""
    from pretrain.data import readers

    hub.requests.clear()
    began = time.perf_counter()
    stream = readers.reader_for(url).samples(url, start)
    next(stream)
    first = (len(hub.requests), time.perf_counter() - began)
    handed = 1 + sum(1 for _ in stream)
    return (*first, hub.bytes_requested(), handed)


def main(argv: list[str] | None = None) -> int:
    import fsspec

    from pretrain.data.readers.parquet import footer

    parser = argparse.ArgumentParser(prog="python -m pretrain.bench remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024, help="samples in the shard (default 1024)")
    parser.add_argument("--image-kb", type=float, default=110, help="bytes of each image, in kB (default 110)")
    parser.add_argument("--row-group", type=int, default=256, help="Parquet samples per row group (default 256)")
    parser.add_argument("--latency-ms", type=float, default=50, help="added to every request (default 50)")
    parser.add_argument("--mb-per-s", type=float, default=100, help="transfer rate of a request (default 100)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_shards(Path(tmp), args.samples, int(args.image_kb * 1000), args.row_group)
        hub_class = LocalHub.serving(Path(tmp), args.latency_ms / 1000, args.mb_per_s * 1e6)
        fsspec.register_implementation("hf", hub_class, clobber=True)
        hub = hub_class()
        rows, per_sample = [], {}
        for fmt, name in names.items():
            size = (Path(tmp) / name).stat().st_size
            for where, start in (("start", 0), ("middle", args.samples // 2 + 1)):
                requests, seconds, read, handed = read_from(hub, f"hf://{name}", start)
                per_sample[fmt, where] = read / handed
                rows.append((f"{fmt}, from its {where}", requests, seconds, read / handed / 1e3, read / size))
        hub.requests.clear()
        began = time.perf_counter()
        footer(f"hf://{names['parquet']}")
        start_up = (len(hub.requests), time.perf_counter() - began, hub.bytes_requested())
    print(f"shard: {args.samples} samples of {args.image_kb:g} kB; {args.latency_ms:g} ms and {args.mb_per_s:g} MB/s "
          f"per request; Parquet row groups of {args.row_group}")
    print(f"{'read':<24} {'requests to 1st':>16} {'s to 1st':>9} {'kB read / sample':>17} {'of the file':>12}")
    for name, requests, seconds, kb, share in rows:
        print(f"{name:<24} {requests:>16} {seconds:>9.3f} {kb:>17.1f} {share:>12.2f}")
    print(f"Parquet footer at start-up (the shard's count): {start_up[0]} requests, {start_up[1]:.3f} s, "
          f"{start_up[2] / 1e3:.1f} kB")
    print(f"ratio {per_sample['parquet', 'middle'] / per_sample['tar', 'middle']:.2f} (Parquet / tar bytes read per "
          f"sample handed out, by a share starting in the middle of the shard)")
    return 0
