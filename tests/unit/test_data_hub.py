"""Image datasets as the Hugging Face Hub ships them: Parquet written by the ``datasets`` library
(read back with the library itself where vitscale writes them), dataset repos on disk (Parquet and
WebDataset tars), the layouts such sets use (other column names, nested structs, images stored as
paths, multi-label), and ``hf://`` URLs through a stand-in for huggingface_hub's file system that
counts the bytes asked for."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the library must never reach for the network here
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402 (after the offline switches)
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pretrain.bench.remote import LocalHub  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.data import check, readers, write  # noqa: E402
from pretrain.data.readers.parquet import Columns, layout  # noqa: E402
from pretrain.data.shards import BrokenShard, ShardError  # noqa: E402
from pretrain.data.sources import resolve  # noqa: E402
from pretrain.data.decode import BadSample, decode  # noqa: E402
from pretrain.data.stream import Loader, ShardDataset  # noqa: E402
from pretrain.data.transforms import EvalView  # noqa: E402
from pretrain.plan import make_plan, resolve_sources  # noqa: E402
from tests.helpers import TINY_DINO, KeyOnlyView  # noqa: E402
from tests.unit.data_samples import image_bytes, tiny_jpeg, write_counted_shards  # noqa: E402

CLASSES = ["cat", "dog", "owl"]


def photo(seed: int, fmt: str = "JPEG") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (12 + seed % 5, 16, 3), dtype=np.uint8)
    return Image.open(io.BytesIO(image_bytes(pixels, fmt)))


def hub_parquet(path: Path, first: int, count: int, classes: list[str] = CLASSES, fmt: str = "JPEG") -> Path:
    """A file as the datasets library writes a labelled image set (``push_to_hub``'s layout): an Image
    column ``image`` ({bytes, path}) and a ClassLabel ``label``, the names in the schema metadata."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    data = datasets.Dataset.from_dict({"image": [photo(first + i, fmt) for i in range(count)],
                                       "label": [(first + i) % len(classes) for i in range(count)]}, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(path))
    return path


def read(path, **columns) -> list[dict]:
    return list(readers.parquet.samples(str(path), columns=Columns(**columns)))


def test_a_file_as_datasets_writes_it_reads_with_keys_from_shard_and_row_labels_and_classes(tmp_path):
    path = hub_parquet(tmp_path / "train-00000-of-00001.parquet", 0, 5, fmt="PNG")
    found = layout(pq.read_schema(path))
    assert (found.image, found.label, found.classes, found.key) == ("image.bytes", "label", CLASSES, False)
    samples = read(path)
    assert [s["__key__"] for s in samples] == [f"train-00000-of-00001.parquet/{i}" for i in range(5)]
    assert [s["cls"] for s in samples] == [b"0", b"1", b"2", b"0", b"1"]
    assert all(set(s) == {"__key__", "__url__", "png", "cls"} for s in samples), "PNG bytes read as png"
    loader = Loader(ShardDataset([str(path)], EvalView(8, 1.0), 5, rank=0, world_size=1, seed=0, train=False), 0)
    (batch,) = list(loader)
    assert batch["label"].tolist() == [0, 1, 2, 0, 1] and tuple(batch["image"].shape[1:]) == (3, 8, 8)
    assert not loader.skipped


@pytest.mark.parametrize("image, label", [("img", "fine_label"), ("jpg", "labels"), ("webp", "cls")])
def test_image_and_label_columns_are_found_under_the_names_such_sets_use(tmp_path, image, label):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({image: [tiny_jpeg(1), tiny_jpeg(2)], label: pa.array([7, 3], pa.int16()),
                             "txt": ["a", "b"]}), path)
    samples = read(path)
    ext = image if image in ("jpg", "webp") else "jpg"  # a column named by an extension keeps its name
    assert [(s[ext], s["cls"], s["txt"]) for s in samples] == [(tiny_jpeg(1), b"7", b"a"), (tiny_jpeg(2), b"3", b"b")]


def test_columns_named_by_the_config_and_nested_image_structs(tmp_path):
    """``data.image_column=sample.photo`` reaches an Image struct inside a struct column."""
    photo_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"sample": pa.array([{"photo": {"bytes": tiny_jpeg(i), "path": f"{i}.jpg"}, "n": i}
                                                 for i in range(3)],
                                                pa.struct([("photo", photo_type), ("n", pa.int64())])),
                             "y": [2, 0, 1]}), path)
    with pytest.raises(BrokenShard, match=r"no image column \(looked for image, img, .*columns: \['sample', 'y'\]\)"
                                          r": name it with data.image_column") as refused:
        read(path)
    assert refused.value.reason == "unreadable_shard"
    samples = read(path, image="sample.photo", label="y")
    assert [(s["jpg"], s["cls"]) for s in samples] == [(tiny_jpeg(i), str(y).encode()) for i, y in enumerate([2, 0, 1])]
    with pytest.raises(BrokenShard, match=r"no column 'sample\.picture' \(data\.image_column; columns: "):
        read(path, image="sample.picture")
    with pytest.raises(BrokenShard, match=r"no column 'target' \(data\.label_column; columns: \['sample', 'y'\]\)"):
        read(path, image="sample.photo", label="target")
    with pytest.raises(BrokenShard, match=r"the image column 'y' holds int64, not image bytes"):
        read(path, image="y")


def test_images_stored_as_paths_only_are_refused_saying_the_bytes_are_not_in_the_file(tmp_path):
    """What ``load_dataset("imagefolder")`` then ``to_parquet`` writes: the files' paths, not their bytes."""
    for i in range(2):
        (tmp_path / "photos" / CLASSES[i]).mkdir(parents=True)
        photo(i).save(tmp_path / "photos" / CLASSES[i] / f"{i}.jpg")
    data = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "photos"), split="train")
    data.to_parquet(str(tmp_path / "paths.parquet"))
    with pytest.raises(BrokenShard, match=r"paths\.parquet: row 0: the image column 'image' holds only a path "
                                          r"\('.*0\.jpg'\); the bytes are not in the file.*embed_table_storage"):
        read(tmp_path / "paths.parquet")
    # Embedded as the message says, the same set reads.
    embedded = data.with_format("arrow").map(datasets.table.embed_table_storage, batched=True).with_format(None)
    embedded.to_parquet(str(tmp_path / "embedded.parquet"))
    assert [s["cls"] for s in read(tmp_path / "embedded.parquet")] == [b"0", b"1"]


def hub_repo(root: Path, counts: dict[str, list[int]], layout_of=lambda split, i, n: f"data/{split}-{i:05d}-of-{n:05d}"
             ) -> dict[str, list[str]]:
    """A ``snapshot_download`` copy: ``counts[split]`` rows per file, and the download cache beside it."""
    keys: dict[str, list[str]] = {}
    first = 0
    for split, sizes in counts.items():
        for i, n in enumerate(sizes):
            path = hub_parquet(root / f"{layout_of(split, i, len(sizes))}.parquet", first, n)
            keys.setdefault(split, []).extend(f"{path.name}/{row}" for row in range(n))
            first += n
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "stale.parquet").write_bytes(b"not the set's")
    (root / "README.md").write_text("---\nlicense: other\n---\n")
    return keys


@pytest.mark.parametrize("repo_layout", ["data", "conversion"])
def test_a_hub_repo_on_disk_gives_splits_counts_and_classes_without_an_index(tmp_path, repo_layout):
    names = {"data": lambda split, i, n: f"data/{split}-{i:05d}-of-{n:05d}",
             "conversion": lambda split, i, n: f"default/{split}/{i:04d}"}[repo_layout]
    keys = hub_repo(tmp_path, {"train": [7, 5, 6], "validation": [4]}, names)
    train, val = resolve(str(tmp_path), "train"), resolve(str(tmp_path), "val")
    assert [Path(u).relative_to(tmp_path).as_posix() for u in train.urls] == [f"{names('train', i, 3)}.parquet"
                                                                             for i in range(3)]
    assert (train.counts, train.samples, train.classes) == ([7, 5, 6], 18, CLASSES)
    assert (val.counts, val.classes) == ([4], CLASSES)
    # Splits exactly over 2 ranks x 2 workers, as shards with an index are.
    shares = [[s["__key__"] for s in ShardDataset(train.urls, KeyOnlyView(), 4, rank=rank, world_size=2, seed=0,
                                                  train=True, counts=train.counts).raw_samples(0, role, 2)]
              for rank in range(2) for role in range(2)]
    assert sorted(k for share in shares for k in share) == sorted(keys["train"])
    assert {len(share) for share in shares} <= {4, 5}
    with pytest.raises(ShardError, match=r"no 'test' split among its 4 shards \(their names say: \['train', 'val'\]"):
        resolve(str(tmp_path), "test")


def test_a_hub_repo_resumes_on_another_number_of_processes(tmp_path):
    """2 ranks read 2 batches each; 1 rank finishes the epoch: every sample once."""
    keys = hub_repo(tmp_path, {"train": [9, 6, 8]})
    source = resolve(str(tmp_path), "train")

    def loader(rank: int, world: int) -> Loader:
        return Loader(ShardDataset(source.urls, KeyOnlyView(), 3, rank=rank, world_size=world, seed=2, train=True,
                                   shuffle_buffer=4, counts=source.counts), 0)

    before, states = [], []
    for rank in range(2):
        old = loader(rank, 2)
        before += [k for batch in islice(old, 2) for k in batch["__keys__"]]
        states.append(old.state_dict())
    new = loader(0, 1)
    new.resume_elsewhere(states)
    # 23 - 12 = 11 left: the 4th batch ends with the first sample of the next epoch
    rest = [k for batch in islice(new, 4) for k in batch["__keys__"]][:11]
    epoch = Counter(before + rest)
    assert sorted(epoch) == sorted(keys["train"]) and max(epoch.values()) == 1


def test_class_names_that_differ_between_shards_are_refused_naming_both(tmp_path):
    hub_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", 0, 3)
    hub_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", 3, 3, classes=["cat", "owl", "dog"])
    with pytest.raises(ShardError, match=r"train-00001-of-00002\.parquet \(3 classes: \['cat', 'owl', 'dog'\]\) "
                                         r"differ from those of .*train-00000-of-00002\.parquet"):
        resolve(str(tmp_path), "train")


def test_check_counts_a_hub_repo_and_names_its_classes_from_the_metadata(tmp_path, capsys):
    hub_repo(tmp_path / "repo", {"train": [4, 5], "validation": [3]})
    assert check.main([str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "12 samples in 3 shards, 12 decoded" in out and "3 classes; samples per class: min 4" in out
    assert {line.split()[0] for line in out.splitlines() if line.startswith("  ")} == set(CLASSES)
    hub_parquet(tmp_path / "other" / "train-00000-of-00002.parquet", 0, 2)
    hub_parquet(tmp_path / "other" / "train-00001-of-00002.parquet", 2, 2, classes=["dog", "cat", "owl"])
    assert check.main([str(tmp_path / "other")]) == 1
    assert re.search(r"train-00001-of-00002\.parquet: its ClassLabel names \(3: \['dog', 'cat', 'owl'\]\) differ "
                     r"from those of .*train-00000-of-00002\.parquet", capsys.readouterr().out)


def test_multi_label_columns_are_refused_for_the_supervised_objective_and_fine_for_self_supervised(tmp_path):
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image": [tiny_jpeg(i, 16) for i in range(4)],
                             "labels": pa.array([[0, 2], [1], [], [2, 1]], pa.list_(pa.int64()))}), path)
    assert resolve(str(tmp_path), "train").labels == "multi"
    supervised = load_config(None, [f"data.train={tmp_path}", "data.num_classes=3", "train.steps=1"])
    with pytest.raises(ConfigError, match=r"label column holds lists of classes \(multi-label\); "
                                          r"objective.name='supervised' needs one class per image"):
        resolve_sources(supervised)
    ssl = load_config(None, [f"data.train={tmp_path}", "data.num_classes=3", "train.steps=1", *TINY_DINO])
    (train, _) = resolve_sources(ssl)
    loader = Loader(ShardDataset(train.urls, EvalView(8, 1.0), 4, rank=0, world_size=1, seed=0, train=False,
                                 counts=train.counts, labelled=ssl.objective.uses_labels), 0)
    (batch,) = list(loader)
    assert batch["label"].tolist() == [-1] * 4 and not loader.skipped, "no label: used, not skipped"
    # A stream that trains on labels skips them as unlabelled.
    with pytest.raises(BadSample, match="no_label: train-00000-of-00001.parquet/0"):
        decode(next(readers.parquet.samples(str(path))))


# -- hf:// URLs, through a stand-in for huggingface_hub's file system --------------------------------

@pytest.fixture
def hub(tmp_path):
    """``hf://PATH`` served from ``tmp_path/hub/PATH`` by the benchmark's stand-in (:class:`LocalHub`),
    which counts the bytes asked for; the real ``hf`` implementation is back afterwards."""
    import fsspec

    registry = sys.modules["fsspec.registry"]._registry
    before = registry.get("hf")
    served = LocalHub.serving(tmp_path / "hub")
    fsspec.register_implementation("hf", served, clobber=True)
    yield served()
    served.release.set()  # a stalled request left behind ends
    if before is None:
        registry.pop("hf", None)
    else:
        registry["hf"] = before


def test_a_few_rows_of_a_large_remote_file_are_read_by_range_requests_not_the_whole_file(tmp_path, hub):
    path = tmp_path / "hub" / "datasets" / "org" / "set" / "train.parquet"
    path.parent.mkdir(parents=True)
    rows = [{"__key__": f"k{i}", "jpg": b"\xff\xd8" + os.urandom(8000), "cls": b"1"} for i in range(256)]
    path.write_bytes(readers.parquet.shard_bytes(rows, row_group=16))  # 2 MB in 16 row groups
    url = "hf://datasets/org/set/train.parquet"
    first = list(islice(readers.parquet.samples(url), 3))
    assert [s["jpg"] for s in first] == [r["jpg"] for r in rows[:3]]
    size = path.stat().st_size
    assert 3 * 8000 < hub.bytes_requested() < size / 8, "the footer and one row group, not the file"
    hub.requests.clear()
    assert [s["__key__"] for s in readers.parquet.samples(url, start=250)] == [f"k{i}" for i in range(250, 256)]
    assert hub.bytes_requested() < size / 8, "a reader starting late fetches only the row groups it reads"


def test_hf_glob_and_brace_patterns_expand_and_take_counts_and_classes_from_the_footers(tmp_path, hub):
    keys = hub_repo(tmp_path / "hub" / "datasets" / "org" / "set", {"train": [5, 4, 6], "validation": [3]})
    base = "hf://datasets/org/set/data"
    train = resolve(f"{base}/train-*.parquet", "train")
    assert train.urls == [f"{base}/train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert (train.counts, train.classes) == ([5, 4, 6], CLASSES)
    braced = resolve(f"{base}/{{train-0000{{0,2}},validation-00000}}-of-*.parquet", "train")
    assert [u.rsplit("/", 1)[1] for u in braced.urls] == ["train-00000-of-00003.parquet",
                                                          "train-00002-of-00003.parquet",
                                                          "validation-00000-of-00001.parquet"]
    with pytest.raises(ShardError, match=r"hf://datasets/org/set/data/test-\*\.parquet: no files match"):
        resolve(f"{base}/test-*.parquet", "train")
    # Read through the stream: the same samples as the files on disk hold.
    loader = Loader(ShardDataset(train.urls, EvalView(8, 1.0), 4, rank=0, world_size=1, seed=0, train=False,
                                 counts=train.counts), 0)
    assert [k for batch in loader for k in batch["__keys__"]] == keys["train"] and not loader.skipped


def test_a_stalled_remote_read_is_skipped_after_shard_timeout_and_counted(tmp_path, hub):
    """The stand-in answers the footer and first row group of train-00001, then stalls."""
    hub.stall["train-00001-of-00003.parquet"] = 2
    directory = tmp_path / "hub" / "data"
    directory.mkdir(parents=True)
    for shard, name in enumerate(["train-00000-of-00003.parquet", "train-00001-of-00003.parquet"]):
        rows = [{"__key__": f"s{shard}-{i}", "jpg": tiny_jpeg(i), "cls": b"0"} for i in range(6)]
        (directory / name).write_bytes(readers.parquet.shard_bytes(rows, row_group=3))
    urls = ["hf://data/train-00001-of-00003.parquet", "hf://data/train-00000-of-00003.parquet"]
    loader = Loader(ShardDataset(urls, KeyOnlyView(), 3, rank=0, world_size=1, seed=0, train=False,
                                 shard_timeout=0.5), 0)
    began = time.monotonic()
    read = [k for batch in loader for k in batch["__keys__"]]
    assert time.monotonic() - began < 5
    assert read == ["s1-0", "s1-1", "s1-2"] + [f"s0-{i}" for i in range(6)], "the row group read before is kept"
    assert dict(loader.skipped) == {"stalled_shard": 1} and loader.broken == [urls[0]]
    hub.stall["train-00000-of-00003.parquet"] = 0  # now its footer hangs too: at start-up that stops the run
    with pytest.raises(ShardError, match=r"train-00000-of-00003\.parquet: a request sent nothing back for 0\.5 s "
                                         r"\(data\.shard_timeout\)"):
        resolve(urls[1], "train", timeout=0.5)


def test_tar_shards_stream_from_hf_urls_and_a_stalled_one_is_skipped(tmp_path, hub):
    """timm's WebDataset repos over hf://: a brace pattern of tars, each streamed in one request
    (they are smaller than STREAM_BLOCK); the one whose first request hangs is given up."""
    write_counted_shards(tmp_path / "hub" / "datasets" / "timm" / "wds", [3, 4, 2], index=False)
    hub.stall["train-000001.tar"] = 0
    urls = resolve("hf://datasets/timm/wds/train-{000000..000002}.tar", "train").urls
    loader = Loader(ShardDataset(urls, KeyOnlyView(), 2, rank=0, world_size=1, seed=0, train=False,
                                 shard_timeout=0.5), 0)
    read = [k for batch in loader for k in batch["__keys__"]]
    assert read == ["s0-0", "s0-1", "s0-2", "s2-0", "s2-1"]
    assert dict(loader.skipped) == {"stalled_shard": 1} and loader.broken == [urls[1]]
    ranges = [(path, start) for path, start, end in hub.requests if end > start]
    assert ranges == [(f"datasets/timm/wds/train-{i:06d}.tar", 0) for i in range(3)], "one request per small tar"

def test_hf_urls_without_huggingface_hub_name_the_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub fails
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "hf", raising=False)
    needs = r"hf://datasets/org/set/data/train-00000-of-00001\.parquet: reading hf:// URLs needs huggingface_hub, " \
            r"which is not installed: pip install 'vitscale\[hub\]'"
    for source in ("hf://datasets/org/set/data/train-00000-of-00001.parquet",
                   "hf://datasets/org/set/data/train-{00000..00001}-of-00001.tar"):
        with pytest.raises(ShardError, match=needs.replace("parquet", "tar") if source.endswith("tar") else needs):
            resolve(source, "train")
    assert check.main(["hf://datasets/org/set/data/train-00000-of-00001.parquet"]) == 2
    assert re.search(needs, capsys.readouterr().err)


def test_a_webdataset_repo_on_disk_gives_its_splits_and_asks_for_the_counts_it_lacks(tmp_path):
    """timm/imagenet-22k-wds's layout: ``imagenet22k-train-0000.tar`` ..., ``imagenet22k-validation-0000.tar``."""
    for split, n in (("train", 3), ("validation", 1)):
        write_counted_shards(tmp_path / "stage", [2] * n, index=False)
        for i in range(n):
            os.replace(tmp_path / "stage" / f"train-{i:06d}.tar", tmp_path / f"imagenet22k-{split}-{i:04d}.tar")
    train, val = resolve(str(tmp_path), "train"), resolve(str(tmp_path), "val")
    assert [Path(u).name for u in train.urls] == [f"imagenet22k-train-{i:04d}.tar" for i in range(3)]
    assert [Path(u).name for u in val.urls] == ["imagenet22k-validation-0000.tar"]
    assert (train.counts, train.samples, train.classes) == (None, None, None)
    base = [f"data.train={tmp_path}", f"data.val={tmp_path}", "data.batch_size=2", "run.dir=" + str(tmp_path / "run")]
    cfg = load_config(None, [*base, "train.steps=1"])
    with pytest.raises(ConfigError, match="data.num_classes is required"):
        make_plan(cfg, 1, resolve_sources(cfg)[0])
    cfg = load_config(None, [*base, "data.num_classes=3", "train.epochs=1"])
    with pytest.raises(ConfigError, match="train.epochs needs the number of training samples: .*data.train_samples"):
        make_plan(cfg, 1, resolve_sources(cfg)[0])
    cfg = load_config(None, [*base, "data.num_classes=3", "data.train_samples=6", "train.epochs=1"])
    assert make_plan(cfg, 1, resolve_sources(cfg)[0]).steps_per_epoch == 3


# -- the other direction: vitscale's Parquet for the datasets library, Hub sets into shards ----------

def image_folder(root: Path, per_class: int = 3) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            photo(10 * c + i, "PNG" if i == 1 else "JPEG").save(root / name / f"{i}.{'png' if i == 1 else 'jpg'}")
    return root


def test_parquet_the_writer_writes_loads_in_datasets_as_images_and_class_labels(tmp_path):
    src = image_folder(tmp_path / "photos")
    assert write.main([str(src), str(tmp_path / "pq"), "--per-shard", "4", "--val-fraction", "0.25", "--workers", "1",
                       "--no-progress", "--format", "parquet"]) == 0
    loaded = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "pq" / "train-*.parquet")},
                                   split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded.features["label"] == datasets.ClassLabel(names=CLASSES)
    assert len(loaded) == 7
    for row in loaded:
        source = json.loads(row["json"])["source"]  # CLASS/N.jpg
        assert CLASSES[row["label"]] == source.split("/")[0]
        original = Image.open(src / source)
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(original.convert("RGB")))
    # vitscale reads what it wrote, with the classes from the ClassLabel as from its index.
    val = resolve(str(tmp_path / "pq"), "val")
    assert val.classes == CLASSES and val.counts == [2]
    labels = [label for batch in Loader(ShardDataset(val.urls, EvalView(8, 1.0), 2, rank=0, world_size=1, seed=0,
                                                     train=False), 0) for label in batch["label"].tolist()]
    assert len(labels) == 2 and all(0 <= label < 3 for label in labels)


def test_parquet_shards_vitscale_wrote_before_still_read(tmp_path):
    """One binary column per extension, the class as decimal text: what the writer wrote before."""
    path = tmp_path / "train-000000.parquet"
    pq.write_table(pa.table({"__key__": ["train-000000-000000", "train-000000-000001"],
                             "jpg": [tiny_jpeg(1), None],
                             "png": [None, image_bytes(np.zeros((4, 4, 3), np.uint8), "PNG")],
                             "cls": [b"2", b"0"], "json": [b"{}", b"{}"]}), path)
    samples = read(path)
    assert [(s["__key__"], s["cls"]) for s in samples] == [("train-000000-000000", b"2"), ("train-000000-000001", b"0")]
    assert samples[0]["jpg"] == tiny_jpeg(1) and "png" in samples[1] and "jpg" not in samples[1]


def source_rows(paths: list[Path]) -> Counter:
    """(image bytes, label) of every row of Hub Parquet files."""
    return Counter((row["image"]["bytes"], row["label"]) for p in paths for row in pq.read_table(p).to_pylist())


def tar_rows(directory: Path) -> Counter:
    return Counter((s["jpg"], int(s["cls"])) for p in sorted(directory.glob("*.tar"))
                   for s in readers.tar.samples(str(p)))


def test_a_hub_parquet_set_is_written_into_tar_shards_split_by_split(tmp_path):
    hub_repo(tmp_path / "repo", {"train": [7, 5, 6], "validation": [4]})
    data = tmp_path / "repo" / "data"
    assert write.main([str(tmp_path / "repo"), str(tmp_path / "train"), "--per-shard", "5", "--workers", "2",
                       "--no-progress"]) == 0
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    assert index["classes"] == CLASSES and [s["samples"] for s in index["splits"]["train"]["shards"]] == [5, 5, 5, 3]
    assert tar_rows(tmp_path / "train") == source_rows(sorted(data.glob("train-*.parquet")))
    assert check.main([str(tmp_path / "train")]) == 0
    assert write.main([str(tmp_path / "repo"), str(tmp_path / "val"), "--split", "val", "--workers", "1",
                       "--no-progress"]) == 0
    assert tar_rows(tmp_path / "val") == source_rows([data / "validation-00000-of-00001.parquet"])
    # One file as the source, into Parquet.
    one = data / "train-00001-of-00003.parquet"
    assert write.main([str(one), str(tmp_path / "one"), "--format", "parquet", "--workers", "1", "--no-progress"]) == 0
    written = read(tmp_path / "one" / "train-000000.parquet")
    assert Counter((s["jpg"], int(s["cls"])) for s in written) == source_rows([one])


def test_a_hub_set_without_a_label_column_is_refused_naming_the_option(tmp_path, capsys):
    path = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"image": [tiny_jpeg(1)], "caption": ["a cat"]}), path)
    assert write.main([str(path), str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 2
    assert re.search(r"photos\.parquet: no label column .*columns: \['image', 'caption'\]\): name it with "
                     r"--label-column", capsys.readouterr().err)


def test_bench_remote_a_parquet_share_from_the_middle_reads_half_what_a_tar_share_reads(capsys):
    from pretrain.bench import remote

    registry = sys.modules["fsspec.registry"]._registry
    before = registry.get("hf")
    try:
        assert remote.main(["--samples", "64", "--image-kb", "40", "--row-group", "8", "--latency-ms", "0",
                            "--mb-per-s", "10000"]) == 0
    finally:
        registry.pop("hf", None)
        if before is not None:
            registry["hf"] = before
    ratio = float(capsys.readouterr().out.splitlines()[-1].split()[1])
    assert 0.4 < ratio < 0.6, "a tar is read from its start, Parquet from the row group of the share's first sample"
