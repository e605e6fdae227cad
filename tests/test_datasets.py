"""Dataset loaders on tiny fixtures in their real on-disk layouts, plus real MVTec files."""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import metrics
from bench.datasets.base import Dataset
from bench.datasets.btad import BTAD
from bench.datasets.cifar10 import CIFAR10, CIFAR10_CLASSES
from bench.datasets.mvtec import MVTec
from bench.datasets.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GroundTruth,
    ImageSet,
    NativeMasks,
    Preprocess,
    load_ground_truth,
)
from bench.errors import BenchError


def esc(path: Path) -> str:
    """A path as a literal inside a ``pytest.raises(match=...)`` pattern."""
    return re.escape(str(path))


def _image(
    path: Path, size: tuple[int, int] = (16, 16), mode: str = "RGB", value: int = 90
) -> Path:
    """A real image file; ``size`` is (width, height) as PIL has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[2:6, 3:9] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_mvtec(
    root: Path,
    category: str = "bottle",
    train: int = 3,
    test: dict[str, int] | None = None,
    mode: str = "RGB",
) -> Path:
    """``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>}`` as MVTec has it."""
    for i in range(train):
        _image(root / category / "train" / "good" / f"{i:03d}.png", mode=mode)
    for defect, n in (test or {"good": 2, "broken_large": 2}).items():
        for i in range(n):
            _image(root / category / "test" / defect / f"{i:03d}.png", mode=mode)
            if defect != "good":
                _mask(root / category / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


# ---- MVTec ---------------------------------------------------------------------------------


def test_mvtec_lists_samples(tmp_path: Path) -> None:
    ds = MVTec(make_mvtec(tmp_path))
    train = ds.train("bottle")
    assert [s.name for s in train] == ["good/000", "good/001", "good/002"]
    assert {(s.label, s.mask, s.defect) for s in train} == {(0, None, "good")}
    test = ds.test("bottle")
    assert [s.name for s in test] == [
        "broken_large/000",
        "broken_large/001",
        "good/000",
        "good/001",
    ]
    assert [s.label for s in test] == [1, 1, 0, 0]
    assert test[0].mask == tmp_path / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"
    assert test[0].defect == "broken_large" and test[2].mask is None


def test_mvtec_partial_folder_lists_what_is_present(tmp_path: Path) -> None:
    make_mvtec(tmp_path, "screw")
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "custom_part")
    (tmp_path / "notes").mkdir()
    (tmp_path / ".cache").mkdir()
    ds = MVTec(tmp_path)
    assert ds.available_categories() == ("bottle", "screw", "custom_part")
    assert len(ds.test("custom_part")) == 4
    with pytest.raises(BenchError, match=r"unknown mvtec category 'nope'; known: bottle, screw"):
        ds.train("nope")
    with pytest.raises(BenchError, match=f"{esc(tmp_path / 'cable')}: missing folder"):
        ds.train("cable")


def test_mvtec_root_without_categories(tmp_path: Path) -> None:
    make_mvtec(tmp_path / "mvtec")
    with pytest.raises(BenchError, match=f"{esc(tmp_path)}: no mvtec category folders found"):
        MVTec(tmp_path).available_categories()


@pytest.mark.parametrize("dataset", [MVTec, BTAD, CIFAR10])
def test_no_data_root(dataset: type[Dataset]) -> None:
    with pytest.raises(BenchError, match="pass --data-root"):
        dataset(None)


def test_mvtec_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    with pytest.raises(BenchError, match=f"{esc(root)}: missing folder"):
        MVTec(root).train("bottle")


@pytest.mark.parametrize(
    ("remove", "part"),
    [("bottle/train/good", "train/good"), ("bottle/train", "train/good"), ("bottle/test", "test")],
)
@pytest.mark.parametrize("split", ["train", "test"])
def test_mvtec_category_folder_without_layout(
    tmp_path: Path, remove: str, part: str, split: str
) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    shutil.rmtree(root / remove)
    with pytest.raises(
        BenchError, match=f"^bottle: no {part} folder under {esc(root / 'bottle')} "
    ):
        getattr(MVTec(root), split)("bottle")


def test_mvtec_empty_splits(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, train=0, test={"good": 0, "crack": 0})
    (root / "bottle" / "train" / "good").mkdir(parents=True)
    (root / "bottle" / "test" / "good").mkdir(parents=True)
    (root / "bottle" / "train" / "good" / "readme.txt").write_text("not an image")
    ds = MVTec(root)
    with pytest.raises(BenchError, match=f"{esc(root / 'bottle/train/good')}: no training images"):
        ds.train("bottle")
    with pytest.raises(BenchError, match=f"{esc(root / 'bottle/test')}: no test images"):
        ds.test("bottle")


def test_mvtec_anomalous_image_without_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    expected = root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png"
    expected.unlink()
    with pytest.raises(BenchError, match=f"{esc(expected)}: missing ground-truth mask .*001.png"):
        MVTec(root).test("bottle")


# ---- the shared pipeline, through the loaders -------------------------------------------------


def test_grayscale_becomes_three_channels(tmp_path: Path) -> None:
    samples = MVTec(make_mvtec(tmp_path, mode="L")).train("bottle")
    tensor = ImageSet(samples, Preprocess((8, 12)))[0]
    assert tensor.shape == (3, 8, 12)
    pixels = tensor * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(
        3, 1, 1
    )
    assert torch.allclose(pixels, torch.full_like(pixels, 90 / 255), atol=1e-5)


def test_masks_binarised_and_nearest_resized(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, test={"good": 1, "crack": 1})
    pattern = np.zeros((16, 16), dtype=np.uint8)
    pattern[:, :8] = 128  # grey is still defect: masks are binarised at > 0
    pattern[4:8, 8:12] = 255
    Image.fromarray(pattern).save(root / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    samples = MVTec(root).test("bottle")
    expected = (pattern > 0).astype(np.uint8)
    up = load_ground_truth(samples, Preprocess((32, 32)), has_masks=True)
    assert up.masks is not None and up.native_masks is not None
    assert np.array_equal(up.masks[0], np.kron(expected, np.ones((2, 2), dtype=np.uint8)))
    assert np.array_equal(up.native_masks[0], expected)
    assert not up.masks[1].any() and up.native_masks[1].shape == (16, 16)
    assert up.labels.tolist() == [1, 0]
    down = load_ground_truth(samples, Preprocess((8, 8)), has_masks=True)
    assert down.masks is not None
    assert set(np.unique(down.masks[0])) == {0, 1}
    assert down.masks[0][:, :4].all() and down.masks[0][2:4, 4:6].all()
    assert not down.masks[0][:2, 4:].any()


def test_centre_crop_applies_to_model_and_native_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, test={"crack": 1})
    pattern = np.zeros((16, 16), dtype=np.uint8)
    pattern[0:2, :] = 255  # outside a 12/16 centre crop
    pattern[7:9, 7:9] = 255  # inside it
    Image.fromarray(pattern).save(root / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    gt = load_ground_truth(MVTec(root).test("bottle"), Preprocess((32, 32), (24, 24)), True)
    assert gt.masks is not None and gt.native_masks is not None
    native = gt.native_masks[0]
    assert native.shape == (12, 12) and native.sum() == 4 and native[5:7, 5:7].all()
    assert gt.masks[0].shape == (24, 24) and gt.masks[0].sum() == 16
    with pytest.raises(BenchError, match="larger than the resized image"):
        Preprocess((16, 16), (24, 24))


def test_unreadable_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    broken = root / "bottle" / "train" / "good" / "001.png"
    broken.write_bytes(b"this is not a png")
    samples = MVTec(root).train("bottle")
    with pytest.raises(BenchError, match=f"{esc(broken)}: unreadable image"):
        ImageSet(samples, Preprocess((8, 8)))[1]
    test_image = root / "bottle" / "test" / "broken_large" / "000.png"
    test_image.write_bytes(b"\x89PNG garbage")
    with pytest.raises(BenchError, match=f"{esc(test_image)}: unreadable image"):
        load_ground_truth(MVTec(root).test("bottle"), Preprocess((8, 8)), has_masks=True)


def test_mask_size_differs_from_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    mask = _mask(root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png", (10, 12))
    with pytest.raises(BenchError, match=f"{esc(mask)}: mask is 10x12 but its image is 16x16"):
        load_ground_truth(MVTec(root).test("bottle"), Preprocess((8, 8)), has_masks=True)


# ---- BTAD ----------------------------------------------------------------------------------


def make_btad(root: Path) -> Path:
    """01: BMP images, PNG masks; 02: PNG and BMP mixed, '_mask' names; 03: 80x60 BMP."""
    layout = {
        "01": ((16, 16), [".bmp", ".bmp"], [".png", ".png"]),
        "02": ((16, 16), [".png", ".bmp"], ["_mask.png", ".bmp"]),
        "03": ((80, 60), [".bmp", ".bmp"], [".bmp", ".bmp"]),
    }
    for cls, (size, image_exts, mask_exts) in layout.items():
        for i, ext in enumerate(image_exts):
            _image(root / cls / "train" / "ok" / f"{i:04d}{ext}", size)
            _image(root / cls / "test" / "ok" / f"{i:04d}{ext}", size)
            _image(root / cls / "test" / "ko" / f"{i:04d}{ext}", size)
        for i, ext in enumerate(mask_exts):
            _mask(root / cls / "ground_truth" / "ko" / f"{i:04d}{ext}", size)
    return root


def test_btad_matches_masks_by_stem(tmp_path: Path) -> None:
    root = make_btad(tmp_path)
    ds = BTAD(root)
    assert [s.name for s in ds.train("01")] == ["ok/0000", "ok/0001"]
    test = ds.test("02")
    assert [(s.name, s.label, s.defect) for s in test] == [
        ("ok/0000", 0, "good"),
        ("ok/0001", 0, "good"),
        ("ko/0000", 1, "ko"),
        ("ko/0001", 1, "ko"),
    ]
    gt = root / "02" / "ground_truth" / "ko"
    assert [s.mask for s in test] == [None, None, gt / "0000_mask.png", gt / "0001.bmp"]
    assert [s.mask.name for s in ds.test("01") if s.mask] == ["0000.png", "0001.png"]


def test_btad_non_square_class(tmp_path: Path) -> None:
    samples = BTAD(make_btad(tmp_path)).test("03")
    pre = Preprocess((48, 64))
    assert ImageSet(samples, pre)[0].shape == (3, 48, 64)
    gt = load_ground_truth(samples, pre, has_masks=True)
    assert gt.masks is not None and gt.native_masks is not None
    assert gt.masks.shape == (4, 48, 64)
    assert [m.shape for m in gt.native_masks] == [(60, 80)] * 4
    assert gt.masks[2].any() and not gt.masks[0].any()


def test_btad_bad_input(tmp_path: Path) -> None:
    root = make_btad(tmp_path)
    ds = BTAD(root)
    with pytest.raises(BenchError, match="unknown btad category '04'; known: 01, 02, 03"):
        ds.train("04")
    (root / "01" / "ground_truth" / "ko" / "0001.png").unlink()
    image = root / "01" / "test" / "ko" / "0001.bmp"
    with pytest.raises(
        BenchError,
        match=f"{esc(image)}: no ground-truth mask found in {esc(root / '01/ground_truth/ko')}",
    ):
        ds.test("01")
    _mask(root / "03" / "ground_truth" / "ko" / "0000_mask.png", (80, 60))
    with pytest.raises(BenchError, match="two masks for image stem '0000'"):
        ds.test("03")
    shutil.rmtree(root / "02" / "train" / "ok")
    with pytest.raises(BenchError, match=f"{esc(root / '02/train/ok')}: missing folder"):
        ds.train("02")
    with pytest.raises(BenchError, match=f"{esc(tmp_path / 'nowhere')}: missing folder"):
        BTAD(tmp_path / "nowhere").train("01")


# ---- CIFAR-10 ------------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes text and bytes as Python 2 byte strings, as the original release files do."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _dump(obj: object, path: Path, python2: bool) -> None:
    if not python2:
        with path.open("wb") as f:
            pickle.dump(obj, f, protocol=2)
        return
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # numpy 1.x, which wrote the release, names the reconstructor numpy.core.multiarray
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def make_cifar(root: Path, python2: bool = False, per_batch: int = 20) -> np.ndarray:
    """The release's files with ``per_batch`` images each; returns the test batch's data."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    test_data = np.empty(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {
            b"batch_label": b"training batch",
            b"labels": [(i * 3) % 10 for i in range(per_batch)],
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        _dump(batch, folder / name, python2)
        test_data = data
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    _dump(meta, folder / "batches.meta", python2)
    return test_data


@pytest.mark.parametrize("python2", [False, True])
def test_cifar_one_vs_rest(tmp_path: Path, python2: bool) -> None:
    test_data = make_cifar(tmp_path, python2)
    ds = CIFAR10(tmp_path)
    train = ds.train("cat")  # label 3: indices 1, 11 of each 20-image batch
    assert len(train) == 10
    assert {(s.label, s.mask, s.defect) for s in train} == {(0, None, "good")}
    test = ds.test("cat")
    labels = [(i * 3) % 10 for i in range(20)]
    assert len(test) == 20
    assert [s.label for s in test] == [0 if y == 3 else 1 for y in labels]
    assert [s.defect for s in test] == ["good" if y == 3 else CIFAR10_CLASSES[y] for y in labels]
    assert test[2].name == "frog/00002"
    image = test[2].image
    assert isinstance(image, np.ndarray) and image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(image, test_data[2].reshape(3, 32, 32).transpose(1, 2, 0))
    gt = load_ground_truth(test, Preprocess((32, 32)), has_masks=CIFAR10.has_masks)
    assert gt.masks is None and gt.labels.sum() == 18
    assert ImageSet(train, Preprocess((32, 32)))[0].shape == (3, 32, 32)


def test_cifar_reads_files_once_and_accepts_batches_dir(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    ds = CIFAR10(tmp_path / "cifar-10-batches-py")
    ds.train("dog")
    ds.test("dog")
    shutil.rmtree(tmp_path / "cifar-10-batches-py")
    assert len(ds.test("frog")) == 20 and len(ds.train("frog")) == 10


def test_cifar_missing_or_foreign_files(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.unlink()
    with pytest.raises(
        BenchError, match=f"{esc(batch)}: missing CIFAR-10 file; .*cifar-10-python.tar.gz"
    ):
        CIFAR10(tmp_path).train("cat")
    batch.write_bytes(b"garbage")
    with pytest.raises(BenchError, match=f"{esc(batch)}: unreadable CIFAR-10 batch"):
        CIFAR10(tmp_path).train("cat")
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    _dump({b"fine_label_names": [b"apple"], b"label_names": [b"apple"]}, meta, python2=False)
    with pytest.raises(BenchError, match=f"{esc(meta)}: label names .* are not CIFAR-10's"):
        CIFAR10(tmp_path).test("cat")
    with pytest.raises(BenchError, match=f"{esc(tmp_path / 'absent')}: missing folder"):
        CIFAR10(tmp_path / "absent").test("cat")


class _Exploit:
    """A pickle payload that runs a shell command when loaded with plain pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_malicious_pickle(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with batch.open("wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(BenchError, match=f"{esc(batch)}: refusing to load '(posix|nt|os).system'"):
        CIFAR10(tmp_path).train("cat")
    assert not marker.exists()


# ---- real MVTec AD files ---------------------------------------------------------------------


def test_real_mvtec_bottle_xs(shared_mvtec: Path) -> None:
    ds = MVTec(shared_mvtec)
    assert ds.available_categories() == ("bottle", "bottle_xs")
    assert [s.name for s in ds.train("bottle_xs")] == [f"good/{i:03d}" for i in range(5)]
    test = ds.test("bottle_xs")
    assert [s.label for s in test] == [1] * 5 + [0] * 5
    assert all(s.mask is not None and s.mask.is_file() for s in test[:5])


def test_real_mvtec_bottle(shared_mvtec: Path) -> None:
    ds = MVTec(shared_mvtec)
    assert len(ds.train("bottle")) == 209
    test = ds.test("bottle")
    anomalous = [s for s in test if s.label == 1]
    assert len(test) == 83 and len(anomalous) == 63
    assert {s.defect for s in anomalous} == {"broken_large", "broken_small", "contamination"}
    gt = load_ground_truth(test, Preprocess((256, 256)), has_masks=True)
    assert gt.masks is not None and gt.native_masks is not None
    assert gt.masks.shape == (83, 256, 256)
    assert {m.shape for m in gt.native_masks} == {(900, 900)}
    assert all(gt.masks[i].any() for i in range(83) if test[i].label == 1)
    assert not gt.masks[gt.labels == 0].any()


def _shift(image: Image.Image, generator: torch.Generator) -> Image.Image:
    """A random augmentation that draws only from the generator it is given."""
    step = int(torch.randint(1, 7, (1,), generator=generator))
    return Image.fromarray(np.roll(np.asarray(image), step, axis=1))


def test_augmentation_does_not_depend_on_the_number_of_workers() -> None:
    from bench.datasets.base import Sample

    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    samples = [Sample(p, 0, None, "good", f"good/{i}") for i, p in enumerate(pixels)]
    pre = Preprocess((16, 16))

    def images(seed: int, workers: int) -> torch.Tensor:
        data = ImageSet(samples, pre, _shift, seed)
        loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=workers)
        return torch.cat(list(loader))

    assert torch.equal(images(5, 0), images(5, 2))
    assert not torch.equal(images(5, 0), images(6, 0))
    assert not torch.equal(
        images(5, 0), torch.cat(list(torch.utils.data.DataLoader(ImageSet(samples, pre), 3)))
    )


def test_native_masks_keep_only_defect_boxes_and_rebuild_every_mask_exactly() -> None:
    rng = np.random.default_rng(0)
    masks = [np.zeros((40, 50), np.uint8), np.ones((30, 30), np.uint8)]
    for _ in range(6):
        mask = np.zeros((int(rng.integers(20, 60)), int(rng.integers(20, 60))), np.uint8)
        top, left = int(rng.integers(0, mask.shape[0])), int(rng.integers(0, mask.shape[1]))
        mask[top : top + 5, left : left + 7] = 1  # corners and edges included
        mask[rng.random(mask.shape) < 0.01] = 1
        masks.append(mask)
    native = NativeMasks()
    for mask in masks:
        native.append(mask)
    assert len(native) == len(masks) and native.shapes == [m.shape for m in masks]
    for rebuilt, mask in zip(native, masks, strict=True):
        assert rebuilt.dtype == np.uint8 and np.array_equal(rebuilt, mask)
    assert native._boxes[0] is None  # a normal image costs its size alone

    big = np.zeros((1024, 1024), np.uint8)
    big[500:510, 600:640] = 1
    one = NativeMasks()
    one.append(big)
    assert one._boxes[0][2].nbytes == 10 * 40


def test_metrics_read_native_masks_as_they_would_a_list() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 16, 16), np.uint8)
    masks[3:, 4:9, 5:12] = 1
    natives = [np.kron(m, np.ones((3, 2), np.uint8)) for m in masks]
    native = NativeMasks()
    for mask in natives:
        native.append(mask)
    maps = rng.random((6, 16, 16)).astype(np.float32) + masks
    labels = np.array([0, 0, 0, 1, 1, 1])
    from_list = metrics.evaluate(GroundTruth(labels, masks, natives), maps.max((1, 2)), maps)
    compact = metrics.evaluate(GroundTruth(labels, masks, native), maps.max((1, 2)), maps)
    assert compact == from_list and compact["aupro"] is not None
