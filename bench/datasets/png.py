"""8-bit PNG decoding with libspng, which gives PIL's pixels a third faster.

MVTec AD, MPDD and MVTec AD 2 ship PNG files (BTAD for one of its products), and decoding
them is most of what loading an image costs: a 900x900 RGB bottle image takes PIL about
14 ms and libspng about 9 ms on a 2-core Xeon (docs/cpu_speed.md). PNG is lossless, so a
correct decoder has no freedom in the pixel values; libspng is used only for the kinds of
file whose PIL decoding it reproduces bit for bit (8 bits per sample; grey, RGB, RGBA; a
test checks each, with and without a transparency chunk, interlaced or not). Every other
file, and any file libspng refuses, is left to PIL.
"""

from __future__ import annotations

import numpy as np
import pyspng
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"

# IHDR colour types libspng decodes here, and the PIL mode PIL itself opens them in
_MODES = {0: "L", 2: "RGB", 6: "RGBA"}


def decode(data: bytes) -> Image.Image | None:
    """The pixels of an 8-bit grey, RGB or RGBA PNG, as the PIL image PIL would open; None
    for anything else (not a PNG, another bit depth, a palette, grey with alpha, which
    libspng does not decode to its own format, or a file libspng rejects)."""
    # the IHDR chunk is first: signature, length (4), b"IHDR", width, height, depth, type
    if len(data) < 26 or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        return None
    depth, colour = data[24], data[25]
    if depth != 8 or colour not in _MODES:
        return None
    try:
        pixels = pyspng.load(data)
    except (RuntimeError, ValueError):
        return None
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return image if image.mode == _MODES[colour] else None
