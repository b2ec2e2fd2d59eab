"""Image datasets as the Hugging Face Hub ships them: Parquet written by the ``datasets`` library
(read back with the library itself where vitscale writes them), dataset repos on disk, and the
layouts such sets use (other column names, nested structs, images stored as paths, multi-label)."""

from __future__ import annotations

import io
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the library must never reach for the network here
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402 (after the offline switches)
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pretrain.data import readers  # noqa: E402
from pretrain.data.readers.parquet import Columns, layout  # noqa: E402
from pretrain.data.shards import BrokenShard  # noqa: E402
from pretrain.data.stream import Loader, ShardDataset  # noqa: E402
from pretrain.data.transforms import EvalView  # noqa: E402
from tests.unit.data_samples import image_bytes, tiny_jpeg  # noqa: E402

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
