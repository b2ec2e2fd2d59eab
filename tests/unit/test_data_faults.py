"""Shards that break while a stream reads them: deleted, cut short, stalled, failing; each is skipped
with a warning and a count, and too many skips stop the stream with a clear message."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from itertools import islice
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.data import check
from pretrain.data.faults import SkipRateError
from pretrain.data.stream import Loader, ShardDataset
from tests.helpers import KeyOnlyView
from tests.unit.data_samples import write_counted_shards


def stream(urls: list[str], train: bool = False, **kw) -> ShardDataset:
    return ShardDataset(urls, KeyOnlyView(), 2, rank=0, world_size=1, seed=0, train=train, **kw)


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["__keys__"]]


def test_shards_deleted_or_cut_short_during_an_epoch_are_skipped_and_counted(tmp_path, caplog):
    urls = write_counted_shards(tmp_path, [6, 6, 6])
    loader = Loader(stream(urls), 0)
    batches = iter(loader)
    first = next(batches)  # shard 0 is open and being read
    Path(urls[1]).unlink()
    whole = Path(urls[2]).read_bytes()
    Path(urls[2]).write_bytes(whole[:len(whole) // 2 + 100])  # mid-block
    with caplog.at_level(logging.WARNING):
        read = keys([first, *batches])
    from_cut = [k for k in read if k.startswith("s2-")]
    assert read[:6] == [f"s0-{i}" for i in range(6)] and not any(k.startswith("s1-") for k in read)
    assert 0 < len(from_cut) < 6 and from_cut == [f"s2-{i}" for i in range(len(from_cut))]  # kept up to the cut
    assert dict(loader.skipped) == {"unreadable_shard": 1, "truncated_shard": 1}
    assert urls[1] in caplog.text and urls[2] in caplog.text


def corrupt_header_checksum(url: str, member: int) -> None:
    """Write non-digits into the checksum field of the tar header of the ``member``-th file."""
    with tarfile.open(url) as tar:
        offset = tar.getmembers()[member].offset
    data = bytearray(Path(url).read_bytes())
    data[offset + 148:offset + 150] = b"\xff\xfe"
    Path(url).write_bytes(bytes(data))


def test_a_corrupt_tar_header_is_a_corrupt_shard_skipped_counted_and_named(tmp_path, caplog, capsys):
    urls = write_counted_shards(tmp_path, [4, 4])
    corrupt_header_checksum(urls[1], 4)  # the third sample's image (two files a sample)
    loader = Loader(stream(urls), 0)
    with caplog.at_level(logging.WARNING):
        read = keys(loader)
    # Kept up to the bad header (s1-1, whose files precede it, is held until a next key proves it whole).
    assert read == [f"s0-{i}" for i in range(4)] + ["s1-0"]
    assert dict(loader.skipped) == {"corrupt_shard": 1}
    assert f"{urls[1]}: bad tar header at byte" in caplog.text
    assert check.main([str(tmp_path)]) == 1
    assert re.search(rf"{re.escape(urls[1])}: unreadable after 1 samples: ReadError: bad tar header", capsys.readouterr().out)


def test_shards_lost_mid_run_stop_training_above_the_skip_rate(tmp_path):
    urls = write_counted_shards(tmp_path, [6, 6, 6])
    batches = iter(Loader(stream(urls, train=True), 0, max_skip_rate=0.2, min_samples=10))
    next(batches)
    for url in urls[1:]:
        Path(url).unlink()
    # Each epoch now reads 6 samples and 2 lost shards: 2 skips per 6 samples, above 0.2.
    with pytest.raises(SkipRateError, match=r"unreadable_shard .* data\.max_skip_rate=0\.2"):
        list(islice(batches, 50))


def test_a_lost_shard_counts_as_its_samples_and_trips_the_skip_rate_naming_it(tmp_path):
    counts = [40] * 8
    urls = write_counted_shards(tmp_path, counts)
    Path(urls[5]).unlink()  # an eighth of the epoch
    loader = Loader(stream(urls, train=True, counts=counts), 0, max_skip_rate=0.05)
    with pytest.raises(SkipRateError) as stopped:
        list(islice(loader, 200))
    message = str(stopped.value)
    assert "unreadable_shard 40" in message and f"broken shards: {urls[5]}" in message, message
    assert "data.max_skip_rate=0.05" in message
    # Below the rate it is counted as the 40 samples it held, once per epoch, and training goes on.
    loader = Loader(stream(urls, train=True, counts=counts), 0, max_skip_rate=0.5)  # early on, 40 of 100
    assert len(list(islice(loader, 150))) == 150  # 300 samples: an epoch (280 readable) and a bit
    assert set(loader.skipped) == {"unreadable_shard"} and loader.skipped["unreadable_shard"] in (40, 80)


@pytest.mark.parametrize("cut", [0, 100], ids=["at-a-block-boundary", "mid-block"])
def test_a_shard_cut_short_counts_the_samples_it_lost(tmp_path, cut):
    urls = write_counted_shards(tmp_path, [10, 10])
    whole = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(whole[:len(whole) // 2 + cut])  # a tar cut at a block boundary reads as whole
    loader = Loader(stream(urls, counts=[10, 10]), 0)
    read = keys(loader)
    from_cut = sum(k.startswith("s0-") for k in read)
    assert 0 < from_cut < 10 and dict(loader.skipped) == {"truncated_shard": 10 - from_cut}


def running(token: str) -> list[int]:
    """Pids of processes whose command line holds ``token``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_stalled_short_and_failing_pipe_shards_are_skipped_without_leaking_their_commands(tmp_path, caplog):
    urls = write_counted_shards(tmp_path, [4, 4, 4])
    size = Path(urls[1]).stat().st_size
    pause = f"{1000 + os.getpid() % 1000}.5"  # a sleep that names this test, to look for it afterwards
    sources = [
        urls[0],
        f"pipe:sleep {pause}; cat {urls[1]}",  # stalls before its first byte
        f"pipe:head -c {size // 2 + 100} {urls[1]}; sleep {pause}",  # stalls half-way
        f"pipe:head -c {size // 2 + 100} {urls[1]}",  # ends early
        "pipe:exit 3",  # fails
        f"pipe:cat {urls[2]}",
    ]
    loader = Loader(stream(sources, shard_timeout=0.5), 0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        read = keys(loader)
    assert time.monotonic() - started < 20
    assert dict(loader.skipped) == {"stalled_shard": 2, "truncated_shard": 1, "unreadable_shard": 1}
    assert "no data for 0.5 s (data.shard_timeout)" in caplog.text and "exited with status 3" in caplog.text
    half = [k for k in read if k.startswith("s1-")]
    assert read[:4] == [f"s0-{i}" for i in range(4)] and read[-4:] == [f"s2-{i}" for i in range(4)]
    assert 0 < len(half) < 8 and len(half) % 2 == 0  # the same samples before each of the two cuts
    assert running(f"sleep {pause}") == []


def test_the_shard_timeout_is_checked():
    with pytest.raises(ConfigError, match="data.shard_timeout"):
        load_config(None, ["data.synthetic=true", "train.steps=1", "data.shard_timeout=0"])


def test_data_workers_leave_save_signals_to_their_rank(tmp_path):
    """scancel, a preemption or Ctrl-C signal every process, data workers included: they must not die
    of it (their rank decides whether to save), and the stream goes on."""
    import psutil

    urls = write_counted_shards(tmp_path, [30, 30])
    batches = iter(Loader(stream(urls, train=True, counts=[30, 30]), 2))
    next(batches)
    workers = psutil.Process().children()
    assert len(workers) == 2
    wait_for(lambda: all(_ignores(w.pid, signal.SIGTERM) for w in workers), "the workers' signal handlers")
    for worker in workers:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(worker.pid, signum)
    assert len(list(islice(batches, 100))) == 100  # more than an epoch: every worker produced again
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_data_workers_end_when_their_rank_is_killed(tmp_path):
    import psutil

    urls = write_counted_shards(tmp_path, [30, 30])
    script = (f"import sys, time\nfrom tests.unit.test_data_faults import Loader, stream\n"
              f"batches = iter(Loader(stream({urls!r}, train=True, counts=[30, 30]), 2))\nnext(batches)\n"
              f"print('ready', flush=True)\ntime.sleep(600)\n")
    rank = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    try:
        assert rank.stdout.readline().strip() == "ready"
        workers = psutil.Process(rank.pid).children()
        assert len(workers) == 2
        rank.kill()
        rank.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"data workers {[p.pid for p in alive]} outlived their rank"
    finally:
        rank.kill()


def test_a_data_worker_that_starts_after_its_rank_died_ends_at_once():
    """A worker can start after its rank is gone (killed while the loader was starting its workers);
    it is then the adopted child of another process, and must still see that its rank is gone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    script = (f"import time\nfrom pretrain.data.workers import shield_worker\n"
              f"shield_worker(0, rank_pid={gone.pid})\ntime.sleep(60)\n")
    started = time.monotonic()
    worker = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert worker.returncode == 1 and not worker.stderr, worker.stderr  # it ended itself, no error
    assert time.monotonic() - started < 30


class StallingView(KeyOnlyView):
    """Stalls a worker for good after its first few samples, as a hung read or decode would."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        if self.calls > 4:
            time.sleep(600)
        return super().__call__(image)


@pytest.mark.parametrize("loader", ["open", "closed with a stalled worker"])
def test_a_rank_that_exits_is_not_held_by_its_data_workers(tmp_path, loader):
    """The workers ignore SIGTERM, which is all multiprocessing's exit hook sends before it joins
    them: a worker alive at exit once hung pytest after its last test had passed. Alive at exit: the
    workers of a loader still open (a suspended generator in a reference cycle), and a worker that
    was busy when its loader closed (the DataLoader waits 5 s for it, then only sends SIGTERM)."""
    urls = write_counted_shards(tmp_path, [30, 30])
    view = "KeyOnlyView()" if loader == "open" else "StallingView()"
    script = (f"from tests.unit.test_data_faults import KeyOnlyView, Loader, ShardDataset, StallingView\n"
              f"batches = iter(Loader(ShardDataset({urls!r}, {view}, 2, rank=0, world_size=1, seed=0, train=True, "
              f"counts=[30, 30]), 2))\n"
              "next(batches)\n"
              + ("del batches\n" if loader != "open" else "") +
              "print('exiting', flush=True)\n")
    try:
        ended = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True,
                               text=True, timeout=90, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: its data workers held it")
    assert ended.returncode == 0 and ended.stdout == "exiting\n", ended.stderr
    assert "Traceback" not in ended.stderr, ended.stderr


def _ignores(pid: int, signum: int) -> bool:
    ignored = int(Path(f"/proc/{pid}/status").read_text().split("SigIgn:")[1].split()[0], 16)
    return bool(ignored >> (signum - 1) & 1)


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
