"""Listing + decoding time per image: the MVTec AD, VisA and Real-IAD loaders on the same files.

    python scripts/dataset_load_speed.py [--source DIR] [--train 60] [--test 40] [--repeats 7]

Writes one set of JPEG images (the photographs of an MVTec-layout category given by
``--source``, e.g. ../shared/data/mvtec/bottle, or generated 256x256 images without it) and
lays the same bytes out three ways: MVTec AD (``train/good``, ``test/<defect>``,
``ground_truth``), VisA (``Data/Images``, ``Data/Masks``, ``split_csv/1cls.csv``) and
Real-IAD (``realiad_1024/<category>/...`` and ``realiad_jsons/<category>.json``). Each
repeat times, for every layout in a rotating order, a fresh loader's train + test listing
and then the decoding of every listed image. Timing on a shared machine drifts, so only
ratios to MVTec AD within one repeat are compared; the medians over repeats are printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from bench.datasets.base import Dataset
from bench.datasets.mvtec import MVTec
from bench.datasets.pipeline import read_image
from bench.datasets.realiad import RealIAD
from bench.datasets.visa import VisA

CATEGORY = "part"


def _photos(source: Path | None, count: int) -> list[Image.Image]:
    """``count`` RGB images: the source's photographs cycled, or seeded generated images."""
    if source is not None:
        paths = sorted(source.glob("*/*/*.png"))
        paths = [p for p in paths if p.parent.parent.name in ("train", "test")]
        if not paths:
            raise SystemExit(f"{source}: no train/*/*.png or test/*/*.png images")
        return [Image.open(paths[i % len(paths)]).convert("RGB") for i in range(count)]
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 256, dtype=np.float32)
    images = []
    for _ in range(count):
        pixels = ramp[None, :, None] + rng.normal(0, 20, (256, 256, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def _mask(size: tuple[int, int]) -> Image.Image:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = 255
    return Image.fromarray(array)


def build(out: Path, source: Path | None, n_train: int, n_test: int) -> dict[str, Path]:
    """The three layouts of the same JPEG files; a third of the test images are anomalous."""
    images = _photos(source, n_train + n_test)
    n_bad = n_test // 3
    roots = {name: out / name for name in ("mvtec", "visa", "realiad")}
    visa_rows = [["object", "split", "label", "image", "mask"]]
    realiad: dict[str, list] = {"train": [], "test": []}
    for i, image in enumerate(images):
        split = "train" if i < n_train else "test"
        bad = i >= n_train + n_test - n_bad
        jpeg = out / "jpeg" / f"{i:04d}.jpg"
        jpeg.parent.mkdir(parents=True, exist_ok=True)
        image.save(jpeg, quality=95)
        mask = out / "jpeg" / f"{i:04d}.png"
        if bad:
            _mask(image.size).save(mask)

        mvtec = roots["mvtec"] / CATEGORY / split / ("broken" if bad else "good")
        _place(jpeg, mvtec / f"{i:04d}.jpg")
        if bad:
            _place(mask, roots["mvtec"] / CATEGORY / "ground_truth/broken" / f"{i:04d}_mask.png")

        folder = "Anomaly" if bad else "Normal"
        rel = f"{CATEGORY}/Data/Images/{folder}/{i:04d}.JPG"
        mask_rel = f"{CATEGORY}/Data/Masks/Anomaly/{i:04d}.png" if bad else ""
        _place(jpeg, roots["visa"] / rel)
        if bad:
            _place(mask, roots["visa"] / mask_rel)
        visa_rows.append([CATEGORY, split, "anomaly" if bad else "normal", rel, mask_rel])

        # five camera views per sample folder, as released
        sample, view = divmod(i, 5)
        kind = f"NG/HS/S{sample:04d}" if bad else f"OK/S{sample:04d}"
        stem = f"{kind}/{CATEGORY}_{sample:04d}_{'NG' if bad else 'OK'}_C{view + 1}_20230101"
        _place(jpeg, roots["realiad"] / "realiad_1024" / CATEGORY / f"{stem}.jpg")
        if bad:
            _place(mask, roots["realiad"] / "realiad_1024" / CATEGORY / f"{stem}.png")
        realiad[split].append(
            {
                "category": CATEGORY,
                "anomaly_class": "HS" if bad else "OK",
                "image_path": f"{stem}.jpg",
                "mask_path": f"{stem}.png" if bad else None,
            }
        )
    # The released split file lists all 12 categories (10,821 rows); the others' rows are
    # read too, so they are here (their files are never looked at).
    for k in range(11 * (n_train + n_test)):
        rel = f"other{k % 11}/Data/Images/Normal/{k:04d}.JPG"
        visa_rows.append([f"other{k % 11}", "train", "normal", rel, ""])
    (roots["visa"] / "split_csv").mkdir()
    with (roots["visa"] / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows(visa_rows)
    meta = {"prefix": CATEGORY, "normal_class": "OK", "pre_transform": False}
    (roots["realiad"] / "realiad_jsons").mkdir()
    (roots["realiad"] / "realiad_jsons" / f"{CATEGORY}.json").write_text(
        json.dumps({"meta": meta, **realiad})
    )
    return roots


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def time_once(make: Callable[[], Dataset]) -> tuple[float, float, int]:
    """(listing seconds, listing + decoding seconds, images) for a fresh loader."""
    start = time.perf_counter()
    dataset = make()
    samples = dataset.train(CATEGORY) + dataset.test(CATEGORY)
    listed = time.perf_counter()
    for sample in samples:
        read_image(sample.image)
    return listed - start, time.perf_counter() - start, len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="an MVTec-layout category folder of photos")
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        roots = build(Path(tmp), args.source, args.train, args.test)
        loaders: dict[str, Callable[[], Dataset]] = {
            "mvtec": lambda: MVTec(roots["mvtec"]),
            "visa": lambda: VisA(roots["visa"]),
            "realiad": lambda: RealIAD(roots["realiad"]),
        }
        names = list(loaders)
        for name in names:  # warm the page cache and check the three agree on the counts
            counts = time_once(loaders[name])[2]
            assert counts == args.train + args.test, (name, counts)
        results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for repeat in range(args.repeats):
            order = names[repeat % 3 :] + names[: repeat % 3]
            for name in order:
                listing, total, _ = time_once(loaders[name])
                results[name].append((listing, total))

    n = args.train + args.test
    print(f"{n} images ({args.train} train, {args.test} test), {args.repeats} alternating repeats")
    print(
        "| layout | listing ms/image | listing+decoding ms/image | ratio to MVTec (listing) | ratio to MVTec (total) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in names:
        listing = statistics.median(r[0] for r in results[name]) / n * 1e3
        total = statistics.median(r[1] for r in results[name]) / n * 1e3
        ratio_list = statistics.median(
            a[0] / b[0] for a, b in zip(results[name], results["mvtec"], strict=True)
        )
        ratio_total = statistics.median(
            a[1] / b[1] for a, b in zip(results[name], results["mvtec"], strict=True)
        )
        print(f"| {name} | {listing:.3f} | {total:.2f} | {ratio_list:.2f} | {ratio_total:.3f} |")


if __name__ == "__main__":
    main()
