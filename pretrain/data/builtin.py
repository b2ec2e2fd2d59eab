"""Small real datasets that ship inside installed packages, written as shards on first use.

``digits``: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upscaled to 32x32 PNGs.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.config import ConfigError
from pretrain.data.shards import INDEX_NAME
from pretrain.data.write import Item, write_shards


def _png(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(pixels).resize((32, 32), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def digits_items() -> tuple[list[str], list[Item]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    items = [Item(f"digits/{i}", int(label), data=_png(p)) for i, (p, label) in
             enumerate(zip(pixels, digits.target))]
    return [str(c) for c in range(10)], items


BUILTIN = {"digits": digits_items}


def prepare(name: str, out: str | os.PathLike) -> bool:
    """Write dataset ``name`` into ``out`` unless its index is there; True when it wrote.

    Written into a temporary sibling and renamed, so a reader never sees half a dataset.
    """
    out = Path(out).expanduser()
    if (out / INDEX_NAME).exists():
        return False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = "is a file" if not out.is_dir() else f"holds other files and no {INDEX_NAME}"
        raise ConfigError(f"data.train={str(out)!r}: data.prepare={name} writes its shards there, but it {held}; "
                          f"name a new or empty directory, or set data.prepare=none to read what is there")
    classes, items = BUILTIN[name]()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_shards(items, classes, tmp, per_shard=180, val_fraction=0.2, seed=0)
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race (or ``out`` exists without an index)
            if not (out / INDEX_NAME).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
