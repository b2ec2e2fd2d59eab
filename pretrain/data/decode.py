"""The decode stage: a raw sample -> (image, class index), or :class:`BadSample` saying why not.

Below it, image bytes -> 8-bit RGB pixels: every image format and mode a shard may hold, decoded as
cheaply as the caller's crop allows. Light on imports (PIL, numpy, simplejpeg), so the shard writer
uses it too.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from pretrain.data.shards import IMAGE_EXTENSIONS

# What PIL and simplejpeg raise for broken files (a truncated JPEG fails only when its pixels are decoded).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode(sample: dict, lazy: bool = False, labelled: bool = True) -> tuple[Image.Image | EncodedImage, int]:
    """(image, class index) of one raw sample, or BadSample; without ``labelled`` (an objective that
    does not train on labels), a sample without one gets -1.

    The image is a decoded RGB PIL image or, with ``lazy``, an :class:`EncodedImage` (header read,
    pixels not decoded) for a view that decodes only what its crop needs.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample("no_image", f"{sample['__key__']} has {sorted(k for k in sample if not k.startswith('__'))}")
    label = -1 if "cls" not in sample and not labelled else label_of(sample)
    try:
        image = EncodedImage.open(sample[ext]) if lazy else load_rgb(Image.open(io.BytesIO(sample[ext])))
    except DECODE_ERRORS as e:
        raise BadSample("undecodable", f"{sample['__key__']}: {e}") from None
    return image, label


def label_of(sample: dict) -> int:
    """The class index of a raw sample, or BadSample (``no_label``, ``bad_label``)."""
    if "cls" not in sample:
        raise BadSample("no_label", sample["__key__"])
    try:
        label = int(sample["cls"])
    except ValueError:
        raise BadSample("bad_label", f"{sample['__key__']}: {sample['cls'][:20]!r}") from None
    if label < 0:
        raise BadSample("bad_label", f"{sample['__key__']}: {label}")
    return label


@dataclass
class EncodedImage:
    """An image's bytes and its header's facts; the pixels are decoded later, by a view that knows
    which part of the image it needs and at what size."""

    data: bytes
    size: tuple[int, int]  # (width, height)
    pil: Image.Image | None = None  # the opened image for formats other than baseline JPEG
    colorspace: str | None = None  # a JPEG's, from its header

    @classmethod
    def open(cls, data: bytes) -> "EncodedImage":
        if data[:2] == b"\xff\xd8":  # JPEG: simplejpeg reads the header without PIL's overhead
            try:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
                return cls(data, (width, height), colorspace=colorspace)
            except ValueError:
                pass  # PIL may still read it (or says why not)
        image = Image.open(io.BytesIO(data))
        return cls(data, image.size, image)

    @property
    def device_decodable(self) -> bool:
        """A JPEG that nvJPEG decodes to RGB: YCbCr or grayscale (not CMYK/YCCK, not PNG & co.)."""
        return self.pil is None and self.colorspace in ("YCbCr", "Gray")

    def pil_image(self) -> Image.Image:
        """The image opened by PIL (pixels not yet decoded)."""
        if self.pil is None:
            self.pil = Image.open(io.BytesIO(self.data))
        return self.pil


def load_rgb(image: Image.Image, reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode a PIL ``image`` into 8-bit RGB.

    ``reduce_to`` (w, h): a JPEG may be decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps
    at least that many pixels. Grayscale, palette, CMYK and alpha images are converted (alpha is
    dropped); 16-bit and 32-bit images are scaled to 8 bits rather than clipped.
    """
    if reduce_to is not None and image.format == "JPEG":
        image.draft("RGB", reduce_to)
    image.load()
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        pixels = np.asarray(image).astype(np.float64)
        top = pixels.max(initial=0.0)
        if top > 255:  # 16-bit (or wider) samples: scale the format's range down to 8 bits
            pixels *= 255.0 / (65535.0 if top <= 65535 else top)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def decode_pixels(image: EncodedImage | Image.Image, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of ``image``; a JPEG may be decoded at a reduced scale (see load_rgb).

    Baseline JPEGs go through simplejpeg (libjpeg-turbo straight into numpy: about 1.5x PIL's
    rate); whatever it refuses (CMYK, odd JPEGs) and other formats through PIL.
    """
    if isinstance(image, EncodedImage):
        if image.pil is None:
            try:
                min_w, min_h = reduce_to or (0, 0)
                return simplejpeg.decode_jpeg(image.data, "RGB", min_height=min_h, min_width=min_w)
            except ValueError:
                image.pil = Image.open(io.BytesIO(image.data))
        image = image.pil
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only numpy memory: nothing here writes to it
        return np.asarray(load_rgb(image, reduce_to))
