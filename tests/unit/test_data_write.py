"""The shard writer and checker on real photos of mixed formats, and the reader's sources (pipe:, http, fsspec)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.data import check, write
from pretrain.data.sources import resolve
from pretrain.data.stream import Loader, ShardDataset
from pretrain.data.transforms import EvalView
from tests.unit.data_samples import FORMATS, image_bytes, write_counted_shards

# scikit-image's sample photos, saved in the formats users have: kept as they are, or re-encoded.
PHOTOS = {"animals": [("chelsea", "JPEG"), ("cat", "PNG"), ("horse", "BMP")],
          "space": [("astronaut", "WEBP"), ("hubble_deep_field", "JPEG"), ("moon", "TIFF"), ("logo", "PNG")],
          "things": [("coffee", "GIF"), ("rocket", "JPEG"), ("camera", "PNG"), ("coins", "JPEG"), ("page", "PPM")]}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    from skimage import data

    src = tmp_path_factory.mktemp("photos")
    for cls, photos in PHOTOS.items():
        (src / cls).mkdir()
        for name, fmt in photos:
            pixels = getattr(data, name)()
            image = Image.fromarray(pixels.astype(np.uint8) * (255 if pixels.dtype == bool else 1))
            if fmt in ("JPEG", "PPM") and image.mode == "RGBA":
                image = image.convert("RGB")
            image.save(src / cls / f"{name}.{fmt.lower()}", fmt)
    (src / "things" / "notes.jpg").write_bytes(b"this is not an image")
    (src / "things" / "cut.jpg").write_bytes((src / "animals" / "chelsea.jpeg").read_bytes()[:5000])
    return src


def read_everything(directory: Path, split: str) -> tuple[Counter, Counter]:
    """(samples per shard, samples per class) as the reader yields them, decoded."""
    shard_set = resolve(str(directory), split)
    dataset = ShardDataset(shard_set.urls, EvalView(16, 1.0), 3, rank=0, world_size=1, seed=0, train=False)
    per_shard, per_class = Counter(), Counter()
    for batch in Loader(dataset, 0):
        per_class.update(batch["label"].tolist())
        per_shard.update(key.rsplit("-", 1)[0] + ".tar" for key in batch["__keys__"])
    return per_shard, per_class


def test_writer_on_real_photos_gives_an_index_the_reader_agrees_with(photo_folder, tmp_path):
    out = tmp_path / "shards"
    assert write.main([str(photo_folder), str(out), "--per-shard", "4", "--val-fraction", "0.2", "--workers", "2",
                       "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == sorted(PHOTOS)
    report = json.loads((out / "report.json").read_text())
    assert sorted(Path(s["source"]).name for s in report["skipped"]) == ["cut.jpg", "notes.jpg"]
    total = 0
    for split in ("train", "val"):
        per_shard, per_class = read_everything(out, split)
        assert per_shard == {s["name"]: s["samples"] for s in index["splits"][split]["shards"]}
        total += sum(per_shard.values())
    assert total == sum(len(p) for p in PHOTOS.values())
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile([n for n in names if n.endswith(".json")][0]).read())
    assert set(meta) == {"class", "source", "size"}
    formats = {n.rsplit(".", 1)[1] for path in out.glob("*.tar") for n in tarfile.open(path).getnames()}
    assert formats == {"jpg", "png", "webp", "cls", "json"}, "JPEG, PNG, WebP kept; BMP, GIF, TIFF, PPM re-encoded"
    assert check.main([str(out)]) == 0


def test_writer_is_deterministic_parallel_and_resumable(photo_folder, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    write.main([str(photo_folder), str(serial), "--per-shard", "3", "--workers", "1", "--seed", "5", "--no-progress"])
    write.main([str(photo_folder), str(parallel), "--per-shard", "3", "--workers", "2", "--seed", "5", "--no-progress"])
    shards = sorted(p.name for p in serial.glob("*.tar"))
    assert shards == sorted(p.name for p in parallel.glob("*.tar")) and len(shards) == 5  # 14 inputs / 3
    assert all((serial / s).read_bytes() == (parallel / s).read_bytes() for s in shards)
    # An interrupted run: one shard lost, one half-written. The rerun writes those two, keeps the rest.
    kept = (serial / shards[0]).stat().st_mtime_ns
    (serial / shards[1]).unlink()
    (serial / shards[2]).write_bytes(b"half a shard")
    classes, items, _ = write.list_source(photo_folder)
    result = write.write_shards(items, classes, serial, per_shard=3, seed=5)
    assert (result["written"], result["kept"]) == (2, 3)
    assert (serial / shards[0]).stat().st_mtime_ns == kept
    assert all((serial / s).read_bytes() == (parallel / s).read_bytes() for s in shards)
    with pytest.raises(write.WriteError, match="other inputs or options"):
        write.write_shards(items, classes, serial, per_shard=2, seed=5)


def _writer(src: Path, out: Path, per_shard: int, together, results) -> None:
    """One writer process; ``together`` holds it until the other has passed the plan check too,
    as happens to two commands started at once (after a few seconds it goes on alone)."""
    atomic_write = write.atomic_write

    def after_both_checked_the_plan(path, data):
        if path.name == "plan.json":
            try:
                together.wait(timeout=3)
            except threading.BrokenBarrierError:
                pass
        atomic_write(path, data)

    write.atomic_write = after_both_checked_the_plan
    classes, items, _ = write.list_source(src)
    try:
        write.write_shards(items, classes, out, per_shard=per_shard)
        results.put((per_shard, "written"))
    except write.WriteError as e:
        results.put((per_shard, str(e)))


def test_a_second_writer_on_the_same_directory_is_refused(photo_folder, tmp_path):
    import multiprocessing

    out = tmp_path / "shards"
    fork = multiprocessing.get_context("fork")
    together, results = fork.Barrier(2), fork.Queue()
    writers = [fork.Process(target=_writer, args=(photo_folder, out, n, together, results)) for n in (3, 5)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(60)
    outcome = dict(results.get(timeout=5) for _ in writers)
    refused = [n for n, said in outcome.items() if said != "written"]
    assert len(refused) == 1, outcome
    assert f"{out} is in use by another shard writer (pid " in outcome[refused[0]]
    # The directory holds the other writer's plan alone: every image once, the check finds nothing.
    index = json.loads((out / "index.json").read_text())
    kept = 3 if refused == [5] else 5
    shards = index["splits"]["train"]["shards"]
    assert sum(s["samples"] for s in shards) == 12 and len(shards) == -(-14 // kept)
    assert check.main([str(out)]) == 0
    with pytest.raises(write.WriteError, match="other inputs or options"):
        classes, items, _ = write.list_source(photo_folder)
        write.write_shards(items, classes, out, per_shard=refused[0])


def test_writer_max_side_and_shard_bytes(photo_folder, tmp_path):
    out = tmp_path / "small"
    write.main([str(photo_folder), str(out), "--shard-bytes", "200kB", "--max-side", "128", "--no-progress"])
    sizes = []
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    sizes.append(json.loads(tar.extractfile(member).read())["size"])
    assert len(sizes) == 12 and max(max(s) for s in sizes) <= 128
    inputs = sum(p.stat().st_size for p in photo_folder.rglob("*.*") if p.name not in ("notes.jpg", "cut.jpg"))
    assert 2 <= len(list(out.glob("*.tar"))) <= inputs // 200_000 + 2


def test_writer_reads_imagenet21k_synset_tars(tmp_path):
    from skimage import data

    src = tmp_path / "in21k"
    src.mkdir()
    photos = {"n01440764": ["chelsea", "coffee"], "n01443537": ["rocket", "astronaut", "retina"]}
    for synset, names in photos.items():
        with tarfile.open(src / f"{synset}.tar", "w") as tar:
            for i, name in enumerate(names):
                payload = image_bytes(getattr(data, name)(), quality=85)
                info = tarfile.TarInfo(f"{synset}_{i}.JPEG")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (src / "n09999999.tar").write_bytes(b"\0" * 100)  # a broken synset tar is reported, not fatal
    out = tmp_path / "shards"
    assert write.main([str(src), str(out), "--per-shard", "2", "--workers", "2", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["n01440764", "n01443537", "n09999999"]
    _, per_class = read_everything(out, "train")
    assert per_class == {0: 2, 1: 3}
    assert [s["source"] for s in json.loads((out / "report.json").read_text())["skipped"]] == [str(src / "n09999999.tar")]


def test_check_reports_every_problem(tmp_path, capsys):
    from tests.unit.data_samples import write_bad_shards

    cases = write_bad_shards(tmp_path)
    assert check.main(cases["urls"]) == 1
    out = capsys.readouterr().out
    for problem in ("undecodable", "no_label", "bad_label", "no_image", "unexpected end of data", "empty shard"):
        assert problem in out
    good = tmp_path / "good"
    write_counted_shards(good, [4, 5])
    assert check.main([str(good), "--decode", "2"]) == 0
    one = write_counted_shards(tmp_path / "one", [1], index=False)[0]
    shutil.copy(one, good / "train-000001.tar")  # now the index is wrong about this shard
    assert check.main([str(good)]) == 1
    assert "1 samples, the index says 5" in capsys.readouterr().out


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.parametrize("fmt", FORMATS)
def test_pipe_http_and_fsspec_sources_read_the_same_samples(tmp_path, http_root, fmt):
    urls = write_counted_shards(tmp_path, [3, 4], fmt=fmt)
    names = [Path(u).name for u in urls]
    sources = {"local": urls,
               "pipe": [f"pipe:cat {u}" for u in urls],
               "http": [f"{http_root}/{n}" for n in names],
               "fsspec": [f"file://{u}" for u in urls],
               "brace": [f"pipe:cat {tmp_path}/train-{{000000..000001}}.{fmt}"]}
    keys = {}
    for name, source in sources.items():
        shard_set = resolve(source, "train")
        dataset = ShardDataset(shard_set.urls, EvalView(8, 1.0), 2, rank=0, world_size=1, seed=0, train=False)
        keys[name] = [k for batch in Loader(dataset, 0) for k in batch["__keys__"]]
    assert all(k == keys["local"] for k in keys.values()) and len(keys["local"]) == 7


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_the_lean_tar_reader_reads_what_tarfile_reads(fmt):
    from pretrain.data.readers.tar import _tarfile_members, tar_members

    rng = np.random.default_rng(fmt)
    buffer = io.BytesIO()
    long_dir = "d" * 150 if fmt != tarfile.USTAR_FORMAT else "p" * 120  # ustar: a prefix field
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name in ("a.jpg", "folder/b.cls", f"{long_dir}/c.jpg", "ünï.png", "e" * 90 + ".json"):
            payload = rng.bytes(int(rng.integers(0, 2000)))
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    whole = buffer.getvalue()
    assert list(tar_members(io.BytesIO(whole))) == list(_tarfile_members(io.BytesIO(whole)))
    assert len(list(tar_members(io.BytesIO(whole)))) == 5
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_members(io.BytesIO(whole[:2500])))
    with pytest.raises(tarfile.ReadError, match="not a tar file"):
        list(tar_members(io.BytesIO(b"<html>" + bytes(600))))


@pytest.mark.parametrize("side", [1, 5, 7])
def test_writer_keeps_jpegs_and_pngs_smaller_than_8_px(tmp_path, side):
    from tests.unit.data_samples import tiny_jpeg

    src = tmp_path / "src"
    (src / "tiny").mkdir(parents=True)
    (src / "tiny" / "a.jpg").write_bytes(tiny_jpeg(0, size=side))
    (src / "tiny" / "b.png").write_bytes(image_bytes(np.full((side, side + 1, 3), 7, np.uint8), "PNG"))
    out = tmp_path / "out"
    assert write.main([str(src), str(out), "--workers", "1", "--no-progress"]) == 0
    assert json.loads((out / "report.json").read_text())["skipped"] == []
    per_shard, per_class = read_everything(out, "train")
    assert per_class == {0: 2}
