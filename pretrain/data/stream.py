"""The sample stream: shards -> split by rank and worker -> shuffle -> decode -> views -> batches.

Every random choice is a function of (seed, epoch, rank, worker role, position), so a stream can be
resumed exactly: the loader records, per worker role, how far into which epoch the trainer has
consumed, and a resumed worker skips that many raw samples without decoding them.

Training streams are endless (epoch after epoch), so no rank ever runs dry before another; the
trainer decides how many steps make a run. Validation streams are finite and see each sample once.
"""

from __future__ import annotations

import io
import logging
import random
import warnings
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from pretrain.data.shards import IMAGE_EXTENSIONS, iter_tar_samples

log = logging.getLogger(__name__)


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode(sample: dict) -> tuple[Image.Image, int]:
    """(RGB image, class index) of one raw sample, or BadSample."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample("no_image", sample["__key__"])
    if "cls" not in sample:
        raise BadSample("no_label", sample["__key__"])
    try:
        label = int(sample["cls"])
    except ValueError:
        raise BadSample("bad_label", sample["__key__"]) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "truncated" and "palette with transparency" chatter
            image = Image.open(io.BytesIO(sample[ext]))
            image = image.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        raise BadSample("undecodable", f"{sample['__key__']}: {e}") from None
    return image, label


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class ShardDataset(IterableDataset):
    """Batches of views from shards, for one rank; DataLoader workers split the rank's share.

    ``roles`` and ``start`` (set by :class:`Loader` before each iteration) say which part of the
    stream each worker plays and from which (epoch, raw sample) it starts.
    """

    def __init__(self, urls: list[str], view: Callable, batch_size: int, *, rank: int, world_size: int,
                 seed: int, train: bool, shuffle_buffer: int = 0) -> None:
        self.urls = list(urls)
        self.view = view
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.roles: list[int] = [0]
        self.start: dict[int, tuple[int, int]] = {}

    # -- which raw samples a (rank, role) reads ---------------------------------------------------

    def epoch_urls(self, epoch: int) -> list[str]:
        if not self.train:
            return self.urls
        order = np.random.default_rng(_seed(self.seed, epoch)).permutation(len(self.urls))
        return [self.urls[i] for i in order]

    def raw_samples(self, epoch: int, role: int, workers: int) -> Iterator[dict]:
        """This role's raw samples of one epoch, in shard order (before shuffling)."""
        urls = self.epoch_urls(epoch)
        slots = self.world_size * workers
        if len(urls) >= slots:  # whole shards per slot: each worker reads only its own
            mine = urls[self.rank::self.world_size][role::workers]
            yield from self._read(mine, self.counters)
        else:  # fewer shards than slots: everyone reads everything and keeps every slots-th sample
            slot = self.rank * workers + role
            for i, sample in enumerate(self._read(urls, self.counters if slot == 0 else Counter())):
                if i % slots == slot:
                    yield sample

    @staticmethod
    def _read(urls: list[str], counters: Counter) -> Iterator[dict]:
        import tarfile

        for url in urls:
            try:
                yield from iter_tar_samples(url)
            except (OSError, tarfile.TarError) as e:
                counters["unreadable_shard"] += 1
                log.warning("skipping the rest of shard %s: %s", url, e)

    def shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role = self.roles[worker] if len(self.roles) == workers else worker
        epoch, skip = self.start.get(role, (0, 0))
        self.counters = Counter()
        batch: list[dict] = []
        while True:
            rng = random.Random(_seed(self.seed, epoch, self.rank, role))
            for index, raw in enumerate(self.shuffled(self.raw_samples(epoch, role, workers), rng)):
                if index < skip:
                    continue  # consumed before a resume: skipped without decoding
                item = self._prepare(raw, _seed(self.seed, epoch, self.rank, role, index))
                if item is None:
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._collate(batch, role, (epoch, index + 1))
                    batch = []
            skip = 0
            epoch += 1
            if not self.train:
                break
        if batch:
            yield self._collate(batch, role, (epoch, 0))

    def _prepare(self, raw: dict, seed: int) -> dict | None:
        # Augmentations draw from the global RNGs; seeding them per sample makes a resumed stream
        # produce the same crops as an uninterrupted one.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            image, label = decode(raw)
            views = self.view(image)
        except BadSample as e:
            self.counters[e.reason] += 1
            log.debug("skipping %s", e)
            return None
        return {**views, "label": label, "__key__": raw["__key__"]}

    def _collate(self, items: list[dict], role: int, position: tuple[int, int]) -> dict:
        keys = [item.pop("__key__") for item in items]
        batch = default_collate(items)
        batch.update(__keys__=keys, __role__=role, __position__=position,
                     __skipped__=dict(self.counters))
        self.counters.clear()
        return batch


class SyntheticDataset(IterableDataset):
    """The same batch of views of random images, forever: a data path that costs nothing."""

    def __init__(self, view: Callable, batch_size: int, image_size: int, num_classes: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        items = []
        for i in range(batch_size):
            pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            items.append({**view(Image.fromarray(pixels)), "label": int(rng.integers(num_classes))})
        self.batch = default_collate(items)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        role = info.id if info else 0
        while True:
            yield {**self.batch, "__role__": role, "__position__": (0, 0), "__skipped__": {}}


class Loader:
    """A DataLoader over a stream dataset that remembers what the trainer consumed.

    ``state_dict()`` holds, per worker role, the (epoch, raw sample) after the last consumed batch;
    a loader restored from it continues with exactly the batches an uninterrupted one would yield.
    """

    def __init__(self, dataset: IterableDataset, workers: int, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.workers = workers
        self.pin_memory = pin_memory
        self.consumed = 0
        self.positions: dict[int, tuple[int, int]] = {}
        self.skipped: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        roles = max(self.workers, 1)
        # The DataLoader serves its workers round-robin from worker 0; rotate roles so that the
        # next batch comes from the role an uninterrupted run would have used.
        self.dataset.roles = [(w + self.consumed) % roles for w in range(roles)]
        self.dataset.start = dict(self.positions)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            pin_memory=self.pin_memory, persistent_workers=False)
        for batch in loader:
            self.positions[batch.pop("__role__")] = tuple(batch.pop("__position__"))
            self.skipped.update(batch.pop("__skipped__"))
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "workers": self.workers,
                "positions": {int(k): list(v) for k, v in self.positions.items()},
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state["workers"] != self.workers:
            raise ValueError(f"data.workers={self.workers} but the checkpoint was written with "
                             f"{state['workers']} workers per rank; the stream cannot resume exactly")
        self.consumed = state["consumed"]
        self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
        self.skipped = Counter(state.get("skipped", {}))
