"""What the checkpoint checksums cost: writing a ZeRO-sized shard against hashing it.

    python -m pretrain.bench checksum [--mib 1024] [--repeats 3] [--dir DIR]

Each repeat writes one fp32 tensor of ``--mib`` MiB with ``torch.save`` and fsync (what a rank's
share of a save costs), then hashes the file with :func:`pretrain.state.layout.file_checksum` (sha256,
streamed; a save hashes the files its rank just wrote, a resume the files it is given), once while
the file is in the page cache (at a save) and once after dropping it from the cache where the OS
allows (``posix_fadvise``; a resume on another node reads from disk). Medians over the repeats;
the last line is the save's time with checksums over its time without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pretrain.state.layout import file_checksum


def write(path: Path, tensor: torch.Tensor) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"fp32_partition": tensor}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def hash_time(path: Path, cold: bool) -> float:
    if cold and hasattr(os, "posix_fadvise"):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    start = time.perf_counter()
    file_checksum(path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.bench checksum", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="shard size in MiB (default 1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write the shard (default: a temporary directory)")
    args = parser.parse_args(argv)
    tensor = torch.rand(args.mib * 2**20 // 4)
    times: dict[str, list[float]] = {"write (torch.save + fsync)": [], "sha256, in page cache": [],
                                     "sha256, from disk": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "optimizer_shard.pt"
        for _ in range(args.repeats):
            times["write (torch.save + fsync)"].append(write(path, tensor))
            times["sha256, in page cache"].append(hash_time(path, cold=False))
            times["sha256, from disk"].append(hash_time(path, cold=True))
    print(f"{'':28s} {'seconds':>8s} {'MiB/s':>8s}   ({args.mib} MiB shard, {args.repeats} repeats, median)")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:28s} {seconds:8.3f} {args.mib / seconds:8.0f}")
    save = medians["write (torch.save + fsync)"]
    print(f"ratio {(save + medians['sha256, in page cache']) / save:.2f} "
          f"(a save's time with checksums over without)")
    return 0
