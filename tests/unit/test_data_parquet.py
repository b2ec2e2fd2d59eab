"""Parquet shards: the writer and the checker on them, what other tools' Parquet files may hold, and
every way a Parquet shard breaks (each skipped, counted under its reason and named, as for tar).
The stream's splitting and resuming on Parquet are tested with tar's, in test_data_stream.py."""

from __future__ import annotations

import json
import logging
import os
import re
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain.data import check, readers, write
from pretrain.data.shards import BrokenShard
from pretrain.data.sources import resolve
from pretrain.data.faults import SkipRateError
from pretrain.data.stream import Loader, ShardDataset
from pretrain.data.transforms import EvalView
from tests.helpers import KeyOnlyView
from tests.unit.data_samples import bad_samples, shard_bytes, tiny_jpeg, write_counted_shards
from tests.unit.test_data_faults import running
from tests.unit.test_data_write import PHOTOS, photo_folder, read_everything  # noqa: F401 (photo_folder: a fixture)


def raw(directory: Path, split: str) -> list[dict]:
    """Every raw sample of a split, in shard order, as its format's reader yields it (without __url__)."""
    urls = resolve(str(directory), split).urls
    return [{k: v for k, v in s.items() if k != "__url__"} for url in urls for s in readers.reader_for(url).samples(url)]


def test_the_parquet_writer_writes_the_tar_writers_samples(photo_folder, tmp_path, capsys):  # noqa: F811
    args = [str(photo_folder), "--per-shard", "4", "--val-fraction", "0.2", "--workers", "1", "--no-progress"]
    assert write.main([args[0], str(tmp_path / "tar"), *args[1:]]) == 0
    assert write.main([args[0], str(tmp_path / "pq"), *args[1:], "--format", "parquet"]) == 0
    tar_index, pq_index = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("tar", "pq"))
    for split in ("train", "val"):
        shards = pq_index["splits"][split]["shards"]
        assert [s["name"] for s in shards] == [s["name"].replace(".tar", ".parquet")
                                               for s in tar_index["splits"][split]["shards"]]
        assert [s["samples"] for s in shards] == [s["samples"] for s in tar_index["splits"][split]["shards"]]
        assert raw(tmp_path / "pq", split) == raw(tmp_path / "tar", split), "the same samples, bytes and order"
        per_shard, _ = read_everything(tmp_path / "pq", split)
        assert per_shard == {s["name"].replace(".parquet", ".tar"): s["samples"] for s in shards}
    schema = pq.read_schema(tmp_path / "pq" / "train-000000.parquet")  # the datasets library's layout
    assert schema.names == ["__key__", "image", "label", "json"]
    assert (schema.field("image").type, schema.field("label").type) == (
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]), pa.int64())
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["label"] == {
        "names": sorted(PHOTOS), "_type": "ClassLabel"}
    assert check.main([str(tmp_path / "pq")]) == 0
    assert "no problems" in capsys.readouterr().out
    # The format is one of the options a rerun must repeat.
    assert write.main([args[0], str(tmp_path / "pq"), *args[1:]]) == 2
    assert "other inputs or options" in capsys.readouterr().err


def test_other_tools_parquet_columns_string_and_integer_read_as_bytes(tmp_path):
    """A LAION-style file: an int64 label, a string caption, a float column the reader ignores."""
    path = tmp_path / "laion-000000.parquet"
    pq.write_table(pa.table({"__key__": ["a", "b", None], "jpg": [tiny_jpeg(1), None, tiny_jpeg(3)],
                             "cls": pa.array([4, 5, 6], pa.int64()), "txt": ["a cat", "a dog", "a cow"],
                             "similarity": [0.3, 0.2, 0.1]}), path)
    samples = list(readers.parquet.samples(str(path)))
    assert [s["__key__"] for s in samples] == ["a", "b", "laion-000000.parquet/2"]
    assert samples[0]["cls"] == b"4" and samples[1]["txt"] == b"a dog" and "jpg" not in samples[1]
    assert samples[2]["jpg"] == tiny_jpeg(3) and not any("similarity" in s for s in samples)
    dataset = ShardDataset([str(path)], EvalView(8, 1.0), 3, rank=0, world_size=1, seed=0, train=False)
    loader = Loader(dataset, 0)
    (batch,) = list(loader)
    assert batch["label"].tolist() == [4, 6] and dict(loader.skipped) == {"no_image": 1}
    # Without a __key__ column, keys come from the shard and row; without an image column, it is refused.
    pq.write_table(pa.table({"key": ["a"], "jpg": [tiny_jpeg(1)]}), tmp_path / "nokey.parquet")
    (sample,) = readers.parquet.samples(str(tmp_path / "nokey.parquet"))
    assert (sample["__key__"], sample["key"], sample["jpg"]) == ("nokey.parquet/0", b"a", tiny_jpeg(1))
    pq.write_table(pa.table({"key": ["a"], "pixels": [[1, 2]]}), tmp_path / "noimage.parquet")
    with pytest.raises(BrokenShard, match=r"no image column .*columns: \['key', 'pixels'\]\)") as error:
        list(readers.parquet.samples(str(tmp_path / "noimage.parquet")))
    assert error.value.reason == "unreadable_shard"


def flip_a_byte_in_row_group(url: str, group: int) -> None:
    """Flip a byte in the middle of the image column's data in row group ``group``: its page checksum fails."""
    metadata = pq.ParquetFile(url).metadata
    column = next(metadata.row_group(group).column(c) for c in range(metadata.num_columns)
                  if metadata.row_group(group).column(c).path_in_schema in ("image.bytes", "jpg"))
    data = bytearray(Path(url).read_bytes())
    data[column.data_page_offset + column.total_compressed_size // 2] ^= 0xFF
    Path(url).write_bytes(bytes(data))


def test_a_reader_starting_inside_a_shard_reads_from_its_row_group_on(tmp_path):
    """Row groups are the unit of reading: a share or a resume starting at sample 4 of 8 (row groups of
    3) never reads the first row group, so a corrupt one there does not touch it."""
    (url,) = write_counted_shards(tmp_path, [8], fmt="parquet", index=False)
    flip_a_byte_in_row_group(url, 0)
    assert [s["__key__"] for s in readers.parquet.samples(url, start=4)] == [f"s0-{i}" for i in range(4, 8)]
    with pytest.raises(BrokenShard, match="CRC checksum verification failed") as error:
        list(readers.parquet.samples(url, start=2))
    assert error.value.reason == "corrupt_shard"


def test_broken_parquet_shards_are_skipped_counted_and_named(tmp_path, caplog, capsys):
    counts = [6, 6, 6, 6, 6]  # row groups of 3
    urls = write_counted_shards(tmp_path, counts, fmt="parquet")
    flip_a_byte_in_row_group(urls[1], 1)
    whole = Path(urls[2]).read_bytes()
    Path(urls[2]).write_bytes(whole[:len(whole) // 2])
    Path(urls[3]).write_bytes(b"<html>" + bytes(600))
    Path(urls[4]).write_bytes(b"")
    loader = Loader(ShardDataset(urls, KeyOnlyView(), 2, rank=0, world_size=1, seed=0, train=False, counts=counts), 0)
    with caplog.at_level(logging.WARNING):
        read = [k for batch in loader for k in batch["__keys__"]]
    # The first row group of the corrupt shard is kept; the rest of it counts as the samples it held.
    assert read == [f"s0-{i}" for i in range(6)] + ["s1-0", "s1-1", "s1-2"]
    assert dict(loader.skipped) == {"corrupt_shard": 3, "truncated_shard": 6, "unreadable_shard": 6, "empty_shard": 6}
    for url, what in zip(urls[1:], ("CRC checksum verification failed", "cut short", "not a Parquet file",
                                    "empty file")):
        assert re.search(rf"{re.escape(url)}: .*{what}", caplog.text), (url, what)
    assert check.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{urls[1]}: unreadable after 3 samples: OSError: " in out
    assert f"{urls[2]}: unreadable after 0 samples: ArrowInvalid: cut short" in out
    assert f"{urls[3]}: unreadable after 0 samples: ArrowInvalid: not a Parquet file" in out
    assert f"{urls[4]}: empty shard" in out
    # Too many of them stop a training stream, naming the shards.
    train = Loader(ShardDataset(urls, KeyOnlyView(), 2, rank=0, world_size=1, seed=0, train=True, counts=counts), 0,
                   max_skip_rate=0.2, min_samples=20)
    with pytest.raises(SkipRateError, match=r"data\.max_skip_rate=0\.2") as stopped:
        list(islice(train, 50))
    named = re.findall(rf"{re.escape(str(tmp_path))}/train-\d+\.parquet", str(stopped.value))
    assert named and set(named) <= set(urls[1:]), str(stopped.value)


def test_bad_images_in_parquet_rows_are_skipped_and_counted(tmp_path, capsys):
    cases = bad_samples()
    good = [{"__key__": f"good-{i}", "jpg": tiny_jpeg(i, 16), "cls": b"2"} for i in range(4)]
    samples = good + [{"__key__": f"case-{name}", **sample} for name, (sample, _) in cases.items()]
    url = tmp_path / "train-000000.parquet"
    url.write_bytes(shard_bytes(samples, "parquet"))
    loader = Loader(ShardDataset([str(url)], EvalView(16, 1.0), 4, rank=0, world_size=1, seed=0, train=False), 0)
    keys = [k for batch in loader for k in batch["__keys__"]]
    usable = [s["__key__"] for s in good] + [f"case-{name}" for name, (_, reason) in cases.items() if reason is None]
    assert sorted(keys) == sorted(usable)
    expected: dict[str, int] = {}
    for _, reason in cases.values():
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert dict(loader.skipped) == expected
    assert check.main([str(url)]) == 1
    out = capsys.readouterr().out
    assert f"{url}: undecodable: case-corrupt_jpeg" in out and f"{url}: no_label: case-missing_cls" in out


def test_stalled_short_and_failing_parquet_pipes_are_skipped_and_counted(tmp_path, caplog):
    """A pipe: Parquet shard is read whole before its rows (its index is at its end): one cut short
    has lost its footer, and one that stalls is given up after data.shard_timeout."""
    urls = write_counted_shards(tmp_path, [4, 4], fmt="parquet")
    size = Path(urls[1]).stat().st_size
    pause = f"{2000 + os.getpid() % 1000}.5"  # a sleep that names this test, to look for it afterwards
    sources = [f"pipe:sleep {pause}; cat {urls[1]}",  # stalls before its first byte
               f"pipe:head -c {size // 2} {urls[1]}; sleep {pause}",  # stalls half-way
               f"pipe:head -c {size // 2} {urls[1]}",  # ends early
               f"pipe:cat {urls[1]}; exit 3",  # fails after sending it all
               f"pipe:cat {urls[0]}"]
    loader = Loader(ShardDataset(sources, KeyOnlyView(), 2, rank=0, world_size=1, seed=0, train=False,
                                 shard_timeout=0.5), 0)
    with caplog.at_level(logging.WARNING):
        read = [k for batch in loader for k in batch["__keys__"]]
    assert read == [f"s0-{i}" for i in range(4)]
    assert dict(loader.skipped) == {"stalled_shard": 2, "truncated_shard": 1, "unreadable_shard": 1}
    assert "no data for 0.5 s (data.shard_timeout)" in caplog.text and "exited with status 3" in caplog.text
    assert running(f"sleep {pause}") == [], "a stalled command outlived its shard"
