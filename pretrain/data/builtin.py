"""Small real datasets that ship inside installed packages, written as shards on first use.

``digits``: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upscaled to 32x32 PNGs.
``skimage_patches``: 32x32 patches cut on a grid from 10 of scikit-image's sample photos, labelled by
the photo (1,210 images, 10 classes): a second real-image set, of natural textures and colour.
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
    return _encode(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR))


def _encode(image: Image.Image) -> bytes:
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


# scikit-image's sample photos shipped inside its wheel (no download): 4 colour photos, 2 grey
# photos and 4 grey textures.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "brick", "grass", "gravel")
PATCH = 32
PATCHES_PER_SIDE = 11


def skimage_patches_items() -> tuple[list[str], list[Item]]:
    """Each photo's central square, resized to 11 x 32 px a side and cut into 121 non-overlapping
    32x32 patches (RGB; grey photos repeated over the channels). Non-overlapping, so a validation
    patch shares no pixel with a training patch."""
    try:
        from skimage import data
    except ImportError as e:
        raise ConfigError("data.prepare=skimage_patches: needs scikit-image (pip install scikit-image), "
                          "whose sample photos it cuts") from e
    side = PATCH * PATCHES_PER_SIDE
    items = []
    for label, name in enumerate(PHOTOS):
        photo = np.asarray(getattr(data, name)())
        h, w = photo.shape[:2]
        top, left = (h - min(h, w)) // 2, (w - min(h, w)) // 2
        square = Image.fromarray(photo[top:top + min(h, w), left:left + min(h, w)]).convert("RGB")
        square = square.resize((side, side), Image.BICUBIC)
        for i in range(PATCHES_PER_SIDE):
            for j in range(PATCHES_PER_SIDE):
                box = (j * PATCH, i * PATCH, (j + 1) * PATCH, (i + 1) * PATCH)
                items.append(Item(f"skimage_patches/{name}/{i}_{j}", label, data=_encode(square.crop(box))))
    return list(PHOTOS), items


BUILTIN = {"digits": digits_items, "skimage_patches": skimage_patches_items}


def prepare_data(data) -> bool:
    """:func:`prepare` for a config's data section: the built-in data set ``data.prepare`` names, into
    ``data.train`` (``none``: nothing). Called before the checks, which then read what it wrote."""
    return data.prepare != "none" and prepare(data.prepare, data.train)


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
