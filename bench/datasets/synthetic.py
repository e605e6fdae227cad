"""The embedded default dataset: generated once, deterministically, read by the MVTec loader.

Textures are crops of real photographs bundled with scikit-image (train and test crops
come from disjoint quadrants of each photo, so nothing is memorised); objects are drawn
procedurally with small variations in pose, colour and lighting. Defects are drawn on top
with an exact mask: the mask is precisely the set of pixels that changed.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bench.datasets.base import cache_dir
from bench.datasets.mvtec import NORMAL, MVTec
from bench.errors import BenchError
from bench.registry import DATASETS

FOLDER_NAME = "synthetic-v2"  # bump with GENERATOR_VERSION whenever the pixels change
GENERATOR = "flowad-bench synthetic"
GENERATOR_VERSION = 2
MANIFEST = "manifest.json"
SEED = 20240917
SIZE = 256
N_TRAIN = 40
N_TEST_GOOD = 8
N_TEST_DEFECTIVE = 16
TEXTURE_CROP = 192  # photo pixels per image side, resized to SIZE
# Normal pixels stay inside [LOW, HIGH], so every defect operation below changes every
# pixel it covers by at least ~10 grey levels: the masks are exact, never speckled.
LOW, HIGH = 16, 240
NOISE_SIGMA = 2.0

TEXTURE_TINTS = {  # photo name in skimage.data -> RGB tint of the grayscale photo
    "brick": (1.0, 0.62, 0.5),
    "gravel": (0.92, 0.9, 0.84),
    "grass": (0.62, 0.95, 0.5),
}
OBJECTS = ("washer", "gelcap")
TEXTURE_DEFECTS = ("hole", "scratch", "stain")
OBJECT_DEFECTS = ("hole", "missing", "scratch", "stain")
CATEGORIES = (*TEXTURE_TINTS, *OBJECTS)
SPLITS = {"train": 0, "test_good": 1, "test_defective": 2}  # rng stream per split


def defect_kinds(category: str) -> tuple[str, ...]:
    return TEXTURE_DEFECTS if category in TEXTURE_TINTS else OBJECT_DEFECTS


def sample_rng(category: str, split: str, index: int) -> np.random.Generator:
    """One independent stream per image: any image can be regenerated on its own."""
    return np.random.default_rng([SEED, CATEGORIES.index(category), SPLITS[split], index])


@dataclass
class Normal:
    """A defect-free image plus what the defect drawing needs to know about it."""

    image: np.ndarray  # (SIZE, SIZE, 3) uint8 in [LOW, HIGH]
    inside: np.ndarray  # bool: where defects may be drawn
    background: np.ndarray | None = None  # objects: the same scene without the object
    edge: np.ndarray | None = None  # objects: bool, the object's outline
    info: dict[str, Any] = field(default_factory=dict)  # provenance for the manifest


def _f32(values: Any) -> np.ndarray:
    """float32 everywhere: generation must take seconds, not tens of seconds."""
    return np.asarray(values, dtype=np.float32)


def _noise(rng: np.random.Generator) -> np.ndarray:
    """Per-pixel brightness noise (grey, like a camera's luminance noise)."""
    return rng.standard_normal((SIZE, SIZE, 1), dtype=np.float32) * NOISE_SIGMA


def _finish(rgb: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb + noise), LOW, HIGH).astype(np.uint8)


def _photo(name: str) -> np.ndarray:
    from skimage import data  # imported here: slow, and only needed when generating

    photo = np.asarray(getattr(data, name)())
    return photo if photo.ndim == 2 else np.asarray(Image.fromarray(photo).convert("L"))


def texture_quadrants(split: str) -> tuple[tuple[int, int], ...]:
    """Disjoint photo regions: train crops from two diagonal quadrants, test from the others.

    Diagonal pairs give both splits a share of the top and the bottom of the photo, so the
    photo's own large-scale changes do not read as anomalies.
    """
    return ((0, 0), (1, 1)) if split == "train" else ((0, 1), (1, 0))


def render_texture(
    category: str, photo: np.ndarray, split: str, rng: np.random.Generator
) -> Normal:
    """A random crop (with flips) inside this split's quadrants of the photo, tinted and lit."""
    qh, qw = photo.shape[0] // 2, photo.shape[1] // 2
    quadrants = texture_quadrants(split)
    qy, qx = quadrants[int(rng.integers(len(quadrants)))]
    top = qy * qh + int(rng.integers(0, qh - TEXTURE_CROP + 1))
    left = qx * qw + int(rng.integers(0, qw - TEXTURE_CROP + 1))
    crop = photo[top : top + TEXTURE_CROP, left : left + TEXTURE_CROP]
    flip_h, flip_v = (bool(f) for f in rng.random(2) < 0.5)
    crop = crop[:, ::-1] if flip_h else crop
    crop = crop[::-1] if flip_v else crop
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((SIZE, SIZE), Image.BICUBIC)
    gray = _f32(resized)[..., None]
    rgb = gray * _f32(TEXTURE_TINTS[category]) * _f32(rng.uniform(0.94, 1.06))
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[20:-20, 20:-20] = True  # keep defects clear of the border
    box = [top, left, TEXTURE_CROP, TEXTURE_CROP]
    return Normal(_finish(rgb, _noise(rng)), inside, info={"box": box, "flip": [flip_h, flip_v]})


@functools.cache
def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x); shared, never modified."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    return yy, xx


def _light(rng: np.random.Generator) -> np.ndarray:
    """A unit light direction from the upper left, jittered per image."""
    angle = math.radians(225 + rng.uniform(-20, 20))
    light = _f32([math.cos(angle), math.sin(angle), 1.6])
    return light / np.linalg.norm(light)


def _washer(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A metal ring with a rounded cross-section: (colour, alpha, background colour)."""
    yy, xx = _grid()
    cx, cy = (SIZE / 2 + rng.uniform(-8, 8, 2)).tolist()
    outer, inner = 86 * rng.uniform(0.97, 1.03), 36 * rng.uniform(0.95, 1.05)
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy) + 1e-6
    mid, half = (outer + inner) / 2, (outer - inner) / 2
    alpha = np.clip(0.5 - (np.abs(r - mid) - half), 0, 1)
    t = np.clip((r - mid) / half, -1, 1)  # position across the ring's cross-section
    normal = np.stack([0.8 * t * dx / r, 0.8 * t * dy / r, np.sqrt(1 - 0.64 * t**2)], -1)
    lit = np.clip(normal @ _light(rng), 0, 1)[..., None]
    metal = _f32([172, 176, 186]) * _f32(rng.uniform(0.98, 1.02, 3)) * rng.uniform(0.95, 1.05)
    colour = metal * (0.45 + 0.5 * lit) + 60 * lit**12
    background = _f32([50, 54, 62]) * _f32(rng.uniform(0.95, 1.05))
    return colour, alpha, background


def _gelcap(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-tone capsule, slightly rotated: (colour, alpha, background colour)."""
    yy, xx = _grid()
    cx, cy = (SIZE / 2 + rng.uniform(-8, 8, 2)).tolist()
    theta = math.radians(rng.uniform(-12, 12))
    along = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    across = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    half_length, radius = 60.0, 32 * rng.uniform(0.97, 1.03)
    dist = np.hypot(along - np.clip(along, -half_length, half_length), across)
    alpha = np.clip(0.5 - (dist - radius), 0, 1)
    seam = np.clip(0.5 + along / 2, 0, 1)[..., None]  # soft two-pixel seam between halves
    jitter = _f32(rng.uniform(0.98, 1.02, 3)) * rng.uniform(0.95, 1.05)
    shell = _f32([212, 104, 38]) * jitter * (1 - seam) + _f32([224, 218, 200]) * seam
    bulge = np.sqrt(np.clip(1 - (dist / radius) ** 2, 0, 1))[..., None]
    highlight = 45 * np.exp(-(((across + 0.4 * radius) / 5) ** 2))[..., None] * bulge
    colour = shell * (0.5 + 0.5 * bulge) + highlight
    background = _f32([66, 70, 78]) * _f32(rng.uniform(0.95, 1.05))
    return colour, alpha, background


_SHAPES: dict[str, Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "washer": _washer,
    "gelcap": _gelcap,
}


def render_object(category: str, rng: np.random.Generator) -> Normal:
    """An object on a plain background; the background alone is kept for 'missing'."""
    colour, alpha, background = _SHAPES[category](rng)
    yy, xx = _grid()
    shading = 1 + 0.06 * ((xx + yy) / SIZE - 1)[..., None]  # soft lighting gradient
    a = alpha[..., None]
    noise = _noise(rng)  # shared, so the empty scene equals the image off the object
    scene = _finish((background * (1 - a) + colour * a) * shading, noise)
    empty = _finish(background * shading, noise)
    return Normal(scene, alpha > 0.5, empty, (alpha > 0.2) & (alpha < 0.8))


def render_normal(
    category: str, split: str, rng: np.random.Generator, photo: np.ndarray | None = None
) -> Normal:
    if category in TEXTURE_TINTS:
        return render_texture(category, _photo(category) if photo is None else photo, split, rng)
    return render_object(category, rng)


# ---- defects ------------------------------------------------------------------------------


def _draw(paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (SIZE, SIZE), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _pick(where: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(where)
    i = int(rng.integers(len(ys)))
    return float(xs[i]), float(ys[i])


def _blob(centre: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular, rotated ellipse-like region."""
    angles = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    phase = rng.uniform(0, 2 * math.pi, 3)
    wobble = 1 + 0.35 * np.cos(2 * angles + phase[0]) + 0.12 * np.cos(3 * angles + phase[1])
    rot = angles + phase[2]
    points = [
        (centre[0] + radius * w * math.cos(a), centre[1] + radius * w * math.sin(a))
        for w, a in zip(wobble, rot, strict=True)
    ]
    return _draw(lambda d: d.polygon(points, fill=255))


def _scratch_region(normal: Normal, rng: np.random.Generator) -> np.ndarray:
    """A thin random polyline: a few segments with gentle turns."""
    x, y = _pick(normal.inside, rng)
    heading = rng.uniform(0, 2 * math.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(3, 6))):
        heading += rng.uniform(-0.6, 0.6)
        step = rng.uniform(20, 36)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        points.append((x, y))
    width = int(rng.integers(4, 7))
    return _draw(lambda d: d.line(points, fill=255, width=width, joint="curve"))


def _scratch(normal: Normal, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    region = _scratch_region(normal, rng) & normal.inside
    old = _f32(normal.image)
    new = old * 0.3 if rng.random() < 0.5 else old + (255 - old) * 0.75
    return new, region


def _hole(normal: Normal, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    region = _blob(_pick(normal.inside, rng), rng.uniform(14, 22), rng) & normal.inside
    return _f32(normal.image) * 0.15, region


def _stain(normal: Normal, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft colour-shifted patch; the mask is where its opacity reaches 0.3."""
    yy, xx = _grid()
    cx, cy = _pick(normal.inside, rng)
    opacity = np.zeros((SIZE, SIZE), dtype=np.float32)
    for _ in range(2):  # two overlapping soft ellipses make an irregular patch
        ox, oy = rng.uniform(-10, 10, 2).tolist()
        sx, sy = rng.uniform(9, 18, 2).tolist()
        opacity += np.exp(-(((xx - cx - ox) / sx) ** 2 + ((yy - cy - oy) / sy) ** 2) / 2)
    opacity = np.clip(opacity, 0, 1)
    region = (opacity >= 0.3) & normal.inside
    hues = _f32([[-70, 35, 80], [75, 60, -70], [80, -60, -40], [-60, 70, -30]])
    shift = hues[rng.integers(len(hues))] * rng.uniform(1.0, 1.2)
    return normal.image + opacity[..., None] * shift, region


def _missing(normal: Normal, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bite out of the object's edge, showing the background behind it."""
    assert normal.background is not None and normal.edge is not None
    region = _blob(_pick(normal.edge, rng), rng.uniform(14, 22), rng)
    region &= (normal.image != normal.background).any(-1)
    return _f32(normal.background), region


_DEFECTS = {"hole": _hole, "missing": _missing, "scratch": _scratch, "stain": _stain}


def add_defect(
    normal: Normal, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(defective image, mask): every mask pixel changed and no other; >= 40 pixels."""
    for _ in range(100):
        new, region = _DEFECTS[kind](normal, rng)
        if region.sum() >= 40:
            changed = np.clip(np.rint(new), 0, 255).astype(np.uint8)
            return np.where(region[..., None], changed, normal.image), region
    raise RuntimeError(f"could not place a '{kind}' defect")  # unreachable in practice


# ---- writing the folder -----------------------------------------------------------------


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=0)  # stored: twice as fast to write


def _write_category(out: Path, category: str) -> list[dict[str, Any]]:
    photo = _photo(category) if category in TEXTURE_TINTS else None
    records: list[dict[str, Any]] = []

    def save(image: np.ndarray, rel: str, record: dict[str, Any]) -> None:
        _save(image, out / rel)
        records.append({"file": rel, **record})

    for i in range(N_TRAIN):
        normal = render_normal(category, "train", sample_rng(category, "train", i), photo)
        save(normal.image, f"{category}/train/{NORMAL}/{i:03d}.png", normal.info)
    for i in range(N_TEST_GOOD):
        normal = render_normal(category, "test", sample_rng(category, "test_good", i), photo)
        save(normal.image, f"{category}/test/{NORMAL}/{i:03d}.png", normal.info)
    kinds = defect_kinds(category)
    counts = dict.fromkeys(kinds, 0)
    for i in range(N_TEST_DEFECTIVE):
        kind = kinds[i % len(kinds)]
        rng = sample_rng(category, "test_defective", i)
        normal = render_normal(category, "test", rng, photo)
        image, mask = add_defect(normal, kind, rng)
        stem = f"{counts[kind]:03d}"
        counts[kind] += 1
        mask_rel = f"{category}/ground_truth/{kind}/{stem}_mask.png"
        _save(mask.astype(np.uint8) * 255, out / mask_rel)
        save(image, f"{category}/test/{kind}/{stem}.png", {**normal.info, "mask": mask_rel})
    return records


def generate(out: Path) -> None:
    """Write every category and, last, the manifest that marks the folder complete."""
    files: list[dict[str, Any]] = []
    for category in CATEGORIES:
        files += _write_category(out, category)
    for record in files:
        for key in ("file", "mask"):
            if key in record:
                record[f"{key}_bytes"] = (out / record[key]).stat().st_size
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": SEED,
        "image_size": SIZE,
        "texture_crop": TEXTURE_CROP,
        "defects": {c: list(defect_kinds(c)) for c in CATEGORIES},
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return (
        manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None
    )


def is_complete(folder: Path) -> bool:
    """True when the manifest is current and every file it lists is there, whole."""
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("version") != GENERATOR_VERSION:
        return False
    expected = {
        record[key]: record[f"{key}_bytes"]
        for record in manifest.get("files", [])
        for key in ("file", "mask")
        if key in record
    }
    return all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == size
        for rel, size in expected.items()
    )


def ensure_generated(folder: Path) -> Path:
    """Generate into a temporary sibling, then rename: a folder is complete or absent."""
    if is_complete(folder):
        return folder
    if folder.exists():
        if _read_manifest(folder) is not None:
            shutil.rmtree(folder)  # ours, but damaged or from an older generator
        elif folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        else:
            raise BenchError(
                f"{folder}: exists but is not a synthetic dataset (no valid {MANIFEST}); "
                "remove it or pass another --data-root"
            )
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        generate(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not is_complete(folder):  # else a concurrent run finished first: use its copy
                raise
    except OSError as exc:
        raise BenchError(
            f"{folder}: cannot write the synthetic dataset ({exc}); set FLOWAD_CACHE or pass "
            "--data-root with a writable folder that has ~60 MB free"
        ) from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp)
    return folder


@DATASETS.register("synthetic")
class Synthetic(MVTec):
    """Textures and objects with drawn defects; generated on first use, then cached.

    ``root`` (``--data-root``) is the dataset folder itself; by default it is
    ``$FLOWAD_CACHE/synthetic-v2`` (``~/.cache/flowad-bench/synthetic-v2``).
    """

    name = "synthetic"
    categories = CATEGORIES

    def __init__(self, root: Path | None = None) -> None:
        super().__init__(Path(root) if root is not None else cache_dir() / FOLDER_NAME)
        self._ready = False

    def folder(self) -> Path:
        assert self.root is not None
        if not self._ready:
            ensure_generated(self.root)
            self._ready = True
        return self.root
