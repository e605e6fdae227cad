"""libspng decodes the PNGs it takes to exactly PIL's pixels; every other file goes to PIL."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.datasets import png
from bench.datasets.pipeline import read_image, read_mask
from bench.errors import BenchError


def _picture(mode: str, size: tuple[int, int] = (37, 29)) -> Image.Image:
    """Smooth gradients plus noise, so the encoder uses several row filters."""
    h, w = size
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    bands = len(Image.new(mode, (1, 1)).getbands())
    planes = [
        ((x * (3 + k) + y * (5 - k)) % 256 + rng.integers(0, 9, (h, w))) % 256 for k in range(bands)
    ]
    array = np.stack(planes, axis=-1).astype(np.uint8)
    return Image.fromarray(array[..., 0] if bands == 1 else array, mode)


def _pil(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert(mode))


def _assert_same_as_pil(path: Path) -> None:
    np.testing.assert_array_equal(np.asarray(read_image(path)), _pil(path, "RGB"))
    size = _pil(path, "L").shape
    np.testing.assert_array_equal(read_mask(path, size), (_pil(path, "L") > 0).astype(np.uint8))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _adam7_png(array: np.ndarray, colour: int) -> bytes:
    """An interlaced 8-bit PNG written by hand (PIL cannot write one): the seven Adam7
    passes, each row with filter type 0."""
    h, w = array.shape[:2]
    raw = bytearray()
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                           (1, 0, 2, 2), (0, 1, 1, 2)):  # fmt: skip
        part = array[y0::dy, x0::dx]
        if part.size:
            for row in part:
                raw += b"\x00" + row.tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 1)
    return (
        png.SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(bytes(raw)))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("mode", "transparency"),
    [("L", None), ("L", 7), ("RGB", None), ("RGB", (1, 2, 3)), ("RGBA", None)],
)
def test_libspng_gives_pil_pixels(tmp_path: Path, mode: str, transparency: object) -> None:
    path = tmp_path / "image.png"
    extra = {} if transparency is None else {"transparency": transparency}
    _picture(mode).save(path, **extra)
    decoded = png.decode(path.read_bytes())
    assert decoded is not None and decoded.mode == mode  # libspng took it
    for target in ("RGB", "L"):
        np.testing.assert_array_equal(np.asarray(decoded.convert(target)), _pil(path, target))
    _assert_same_as_pil(path)


@pytest.mark.parametrize(("colour", "bands"), [(0, 1), (2, 3), (6, 4)])
def test_interlaced_png(tmp_path: Path, colour: int, bands: int) -> None:
    array = np.asarray(_picture({1: "L", 3: "RGB", 4: "RGBA"}[bands], (13, 11)))
    path = tmp_path / "interlaced.png"
    path.write_bytes(_adam7_png(array, colour))
    assert png.decode(path.read_bytes()) is not None
    np.testing.assert_array_equal(
        _pil(path, "RGB"), np.asarray(Image.fromarray(array).convert("RGB"))
    )
    _assert_same_as_pil(path)


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("P", ".png"), ("1", ".png"), ("LA", ".png"),
                                              ("RGB", ".jpg"), ("RGB", ".bmp")])  # fmt: skip
def test_other_files_go_to_pil(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    picture = _picture("RGB")
    if mode == "P":
        picture = picture.quantize(17)
    elif mode != "RGB":
        picture = picture.convert("L").convert(mode)
    picture.save(path)
    assert png.decode(path.read_bytes()) is None
    _assert_same_as_pil(path)


def test_a_png_libspng_rejects_is_pil_s_to_judge(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    _picture("RGB").save(path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # corrupt the image data's checksum region
    path.write_bytes(bytes(data[:-30]))  # and cut the file short
    assert png.decode(path.read_bytes()) is None
    with pytest.raises(BenchError, match="broken.png: unreadable image"):
        read_image(path)
    with pytest.raises(BenchError, match="broken.png: unreadable mask"):
        read_mask(path, (29, 37))


def test_real_mvtec_images_and_masks(shared_mvtec: Path) -> None:
    bottle = shared_mvtec / "bottle"
    images = sorted((bottle / "test" / "broken_large").glob("*.png"))[:3]
    assert images
    for image in images:
        assert png.decode(image.read_bytes()) is not None
        np.testing.assert_array_equal(np.asarray(read_image(image)), _pil(image, "RGB"))
        mask = bottle / "ground_truth" / "broken_large" / f"{image.stem}_mask.png"
        np.testing.assert_array_equal(
            read_mask(mask, (900, 900)), (_pil(mask, "L") > 0).astype(np.uint8)
        )
