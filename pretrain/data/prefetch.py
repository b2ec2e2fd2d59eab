"""Training batches on the device, prepared while the previous step computes.

:class:`DeviceBatches` takes a :class:`~pretrain.data.stream.Loader`'s pinned uint8 batches, copies
them to the device with ``non_blocking`` and decodes any JPEGs left to the device
(:mod:`pretrain.data.device_decode`). On CUDA a background thread does this on its own stream a
couple of batches ahead, so the copy and the decoding overlap the current step's compute; the
default stream waits on an event before it reads a batch. On the CPU (and with ``data.workers=0``,
where the loader seeds the global RNGs in the thread that reads it) the same work runs inline.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter

import torch

from pretrain.data.device_decode import DEFERRED, assemble

log = logging.getLogger(__name__)

_END = object()


class DeviceBatches:
    """An iterator over ``loader``'s batches on ``device``, without its ``__`` bookkeeping keys.

    The loader runs ahead of the trainer, so what a checkpoint must record is the loader's state
    as of the last batch handed out: :meth:`state_dict` (and :attr:`skipped`, its skip counts).
    """

    def __init__(self, loader, device: torch.device, background: bool | None = None, depth: int = 2) -> None:
        self.loader, self.device = loader, device
        if background is None:
            background = device.type == "cuda" and loader.workers > 0
        self.background = background
        self._state = loader.state_dict()
        self._batches = iter(loader)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="device-batches", daemon=True)
            self._thread.start()

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> dict:
        if not self.background:
            batch, self._state = self._produce()
            return batch
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the device batch thread stopped without a word") from None
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._state, ready = item
        if ready is not None:  # the batch was made on the side stream: wait for it, and tell the
            stream = torch.cuda.current_stream(self.device)  # allocator that this stream uses it now
            stream.wait_event(ready)
            for value in batch.values():
                if torch.is_tensor(value):
                    value.record_stream(stream)
        return batch

    def state_dict(self) -> dict:
        """The loader's state after the last batch handed out."""
        return self._state

    @property
    def skipped(self) -> Counter:
        return Counter(self._state["skipped"])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        elif hasattr(self._batches, "close"):
            self._batches.close()

    # -- the work -----------------------------------------------------------------------------------
    def _produce(self) -> tuple[dict, dict]:
        """The next batch on the device and the loader's state after it; StopIteration at the end."""
        while True:
            raw = next(self._batches)
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in raw.items() if not k.startswith("__") or k == DEFERRED}
            batch, failed = assemble(batch, self.device)
            if failed:
                self.loader.skipped["undecodable"] += len(failed)
                log.warning("%d JPEGs failed to decode on %s and were skipped: %s", len(failed), self.device,
                            ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else ""))
            if batch is not None:  # None: nothing in it could be decoded; on to the next one
                return batch, self.loader.state_dict()

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        try:
            if cuda:
                torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device) if cuda else None
            while not self._stop.is_set():
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    try:
                        batch, state = self._produce()
                    except StopIteration:
                        self._put(_END)
                        return
                    ready = None
                    if cuda:
                        ready = torch.cuda.Event()
                        ready.record(stream)
                self._put((batch, state, ready))
        except BaseException as e:  # handed to the trainer's thread, which raises it
            self._put(e)
        finally:
            if hasattr(self._batches, "close"):
                self._batches.close()  # shuts the DataLoader's workers down

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
