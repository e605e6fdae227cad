"""VisA, MPDD, MVTec AD 2 and Real-IAD on small files written in their released layouts."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.cli import main
from bench.datasets.mpdd import MPDD
from bench.datasets.mvtec import MVTec
from bench.datasets.mvtec_ad2 import MVTecAD2
from bench.datasets.pipeline import ImageSet, Preprocess, load_ground_truth, read_image
from bench.datasets.realiad import RealIAD
from bench.datasets.visa import VisA
from bench.errors import BenchError


def esc(path: Path | str) -> str:
    return re.escape(str(path))


def _image(path: Path, size: tuple[int, int] = (20, 16), value: int = 90) -> Path:
    """A real image file (PNG or JPEG by suffix); ``size`` is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (20, 16), on: int = 255) -> Path:
    """A defect mask whose defect pixels hold ``on`` (255 or 1, as the releases vary)."""
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[3:7, 4:12] = on
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _expected_mask(size: tuple[int, int] = (20, 16)) -> np.ndarray:
    """What every mask written by ``_mask`` reads as, whatever its ``on`` value."""
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[3:7, 4:12] = 1
    return array


def _native_masks(samples: list) -> list[np.ndarray]:
    gt = load_ground_truth(samples, Preprocess((16, 16)), has_masks=True)
    assert gt.native_masks is not None
    return gt.native_masks


# ---- MVTec-style folders: a category folder without its layout --------------------------------


def test_category_folder_without_train_good_says_so(tmp_path: Path) -> None:
    _image(tmp_path / "bottle" / "train" / "good" / "000.png")
    _image(tmp_path / "bottle" / "test" / "good" / "000.png")
    _image(tmp_path / "brick" / "test" / "good" / "000.png")  # a custom category, half copied
    ds = MVTec(tmp_path)
    assert ds.available_categories() == ("bottle",)
    for split in (ds.train, ds.test):
        with pytest.raises(
            BenchError, match=f"^brick: no train/good folder under {esc(tmp_path / 'brick')} "
        ):
            split("brick")
    with pytest.raises(BenchError, match="unknown mvtec category '../bottle'"):
        ds.train("../bottle")


# ---- MPDD: the MVTec AD layout ----------------------------------------------------------------


def make_mpdd(root: Path) -> Path:
    for category in ("tubes", "bracket_black"):
        for i in range(3):
            _image(root / category / "train" / "good" / f"{i:03d}.png")
        _image(root / category / "test" / "good" / "000.png")
        for defect in ("bend_and_parts_mismatch", "scratches"):
            _image(root / category / "test" / defect / "000.png")
            _mask(root / category / "ground_truth" / defect / "000_mask.png")
    return root


def test_mpdd(tmp_path: Path) -> None:
    ds = MPDD(make_mpdd(tmp_path))
    assert ds.available_categories() == ("bracket_black", "tubes")
    assert [s.name for s in ds.train("tubes")] == ["good/000", "good/001", "good/002"]
    test = ds.test("tubes")
    assert [(s.name, s.label, s.defect) for s in test] == [
        ("bend_and_parts_mismatch/000", 1, "bend_and_parts_mismatch"),
        ("good/000", 0, "good"),
        ("scratches/000", 1, "scratches"),
    ]
    assert test[2].mask == tmp_path / "tubes" / "ground_truth" / "scratches" / "000_mask.png"
    assert np.array_equal(_native_masks(test)[0], _expected_mask())
    with pytest.raises(
        BenchError, match="unknown mpdd category 'metal'; known: bracket_black, tubes"
    ):
        ds.train("metal")
    with pytest.raises(BenchError, match=f"{esc(tmp_path / 'connector')}: missing folder for mpdd"):
        ds.train("connector")
    with pytest.raises(BenchError, match=r"pass --data-root .*\(bracket_black/, bracket_brown/"):
        MPDD(None)


# ---- MVTec AD 2 -------------------------------------------------------------------------------


def make_mvtec_ad2(root: Path, category: str = "can", on: int = 255) -> Path:
    """The released tree, with the private test sets (never read) beside the public one."""
    base = root / category
    for i in range(3):
        _image(base / "train" / "good" / f"{i:03d}_regular.png")
    for i in range(2):
        _image(base / "validation" / "good" / f"{i:03d}_regular.png", value=120)
        _image(base / "test_public" / "good" / f"{i:03d}_regular.png", value=30)
        _image(base / "test_public" / "bad" / f"{i:03d}_regular.png", value=200)
        _mask(base / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", on=on)
        _image(base / "test_private" / f"{i:03d}.png")
        _image(base / "test_private_mixed" / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("on", [255, 1])
def test_mvtec_ad2_splits(tmp_path: Path, on: int) -> None:
    ds = MVTecAD2(make_mvtec_ad2(tmp_path, on=on))
    assert ds.available_categories() == ("can",)
    base = tmp_path / "can"
    train, validation, test = ds.train("can"), ds.validation("can"), ds.test("can")
    assert [s.image for s in train] == [base / f"train/good/{i:03d}_regular.png" for i in range(3)]
    assert [s.image for s in validation] == [
        base / f"validation/good/{i:03d}_regular.png" for i in range(2)
    ]
    assert [(s.name, s.label, s.defect) for s in test] == [
        ("bad/000_regular", 1, "bad"),
        ("bad/001_regular", 1, "bad"),
        ("good/000_regular", 0, "good"),
        ("good/001_regular", 0, "good"),
    ]
    assert test[1].mask == base / "test_public/ground_truth/bad/001_regular_mask.png"
    used = {s.image for s in train + test}
    assert not used & {s.image for s in validation}
    assert all("test_public" in s.image.parts for s in test)
    masks = _native_masks(test)
    assert np.array_equal(masks[0], _expected_mask()) and not masks[2].any()


def test_mvtec_ad2_bad_layouts(tmp_path: Path) -> None:
    root = make_mvtec_ad2(tmp_path)
    mask = root / "can" / "test_public" / "ground_truth" / "bad" / "001_regular_mask.png"
    mask.unlink()
    with pytest.raises(BenchError, match=f"{esc(mask)}: missing ground-truth mask"):
        MVTecAD2(root).test("can")
    shutil.rmtree(root / "can" / "test_public")
    with pytest.raises(BenchError, match=f"^can: no test_public folder under {esc(root / 'can')} "):
        MVTecAD2(root).train("can")
    make_mvtec_ad2(tmp_path, "rice")
    shutil.rmtree(root / "rice" / "train")
    with pytest.raises(
        BenchError, match=f"^rice: no train/good folder under {esc(root / 'rice')} "
    ):
        MVTecAD2(root).test("rice")
    make_mvtec_ad2(tmp_path, "vial")
    shutil.rmtree(root / "vial" / "validation")
    with pytest.raises(BenchError, match=f"{esc(root / 'vial/validation/good')}: missing folder"):
        MVTecAD2(root).validation("vial")


# ---- VisA -------------------------------------------------------------------------------------

VISA_HEADER = ["object", "split", "label", "image", "mask"]


def make_visa(
    root: Path,
    counts: dict[str, tuple[int, int, int]] | None = None,
    on: int = 255,
    extra_rows: list[list[str]] | None = None,
) -> Path:
    """The released tree: per category (train, test normal, test anomalous) JPEG images,
    PNG masks, image_anno.csv, and split_csv/1cls.csv shuffled with CRLF line ends."""
    rows: list[list[str]] = []
    for category, (n_train, n_good, n_bad) in (counts or {"candle": (3, 2, 2)}).items():
        annotations = [["image", "label", "mask"]]
        for i in range(n_train + n_good):
            rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            _image(root / rel, value=60 + i)
            rows.append([category, "train" if i < n_train else "test", "normal", rel, ""])
            annotations.append([rel, "normal", ""])
        for i in range(n_bad):
            rel = f"{category}/Data/Images/Anomaly/{i:03d}.JPG"
            mask = f"{category}/Data/Masks/Anomaly/{i:03d}.png"
            _image(root / rel, value=200 - i)
            _mask(root / mask, on=on)
            rows.append([category, "test", "anomaly", rel, mask])
            annotations.append([rel, "scratch,missing" if i else "bent", mask])
        with (root / category / "image_anno.csv").open("w", newline="") as f:
            csv.writer(f).writerows(annotations)
    random.Random(0).shuffle(rows)
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows([VISA_HEADER, *rows, *(extra_rows or [])])
    return root


@pytest.mark.parametrize("on", [255, 1])
def test_visa_splits(tmp_path: Path, on: int) -> None:
    root = make_visa(tmp_path, on=on)
    assert b"\r\n" in (root / "split_csv" / "1cls.csv").read_bytes()  # as released
    ds = VisA(root)
    train = ds.train("candle")
    assert [s.image for s in train] == [
        root / f"candle/Data/Images/Normal/{i:04d}.JPG" for i in range(3)
    ]
    assert {(s.label, s.mask, s.defect) for s in train} == {(0, None, "good")}
    test = ds.test("candle")
    assert [(s.name, s.label, s.defect) for s in test] == [
        ("Anomaly/000", 1, "anomaly"),
        ("Anomaly/001", 1, "anomaly"),
        ("Normal/0003", 0, "good"),
        ("Normal/0004", 0, "good"),
    ]
    assert [s.mask for s in test] == [
        root / "candle/Data/Masks/Anomaly/000.png",
        root / "candle/Data/Masks/Anomaly/001.png",
        None,
        None,
    ]
    masks = _native_masks(test)
    assert np.array_equal(masks[1], _expected_mask()) and not masks[3].any()
    assert ImageSet(test, Preprocess((8, 8)))[0].shape == (3, 8, 8)


def test_visa_categories(tmp_path: Path) -> None:
    counts = {"pcb4": (2, 1, 1), "bottle": (2, 1, 1), "candle": (2, 1, 1), "cashew": (2, 1, 1)}
    root = make_visa(tmp_path, counts)
    (root / "capsules").mkdir()  # a folder the split file does not list
    ds = VisA(root)
    assert ds.available_categories() == ("candle", "cashew", "pcb4", "bottle")
    assert len(ds.train("bottle")) == 2 and len(ds.test("pcb4")) == 2
    with pytest.raises(BenchError, match="unknown visa category 'capsules'; known: candle, "):
        ds.train("capsules")
    shutil.rmtree(root / "cashew")
    with pytest.raises(BenchError, match=f"{esc(root / 'cashew')}: missing folder for visa"):
        ds.test("cashew")


def _rewrite_split(root: Path, edit) -> Path:
    path = root / "split_csv" / "1cls.csv"
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _row_of(rows: list[list[str]], image_suffix: str) -> int:
    return next(i for i, r in enumerate(rows) if r[3].endswith(image_suffix))


@pytest.mark.parametrize(
    ("column", "value"),
    [
        (3, "../outside.JPG"),
        (3, "candle/Data/../../outside.JPG"),
        (3, "ABSOLUTE"),
        (4, "../outside.png"),
        (4, "ABSOLUTE"),
        (4, "C:\\VisA\\outside.png"),
    ],
)
def test_visa_refuses_paths_outside_the_root(tmp_path: Path, column: int, value: str) -> None:
    root = make_visa(tmp_path / "visa")
    outside = _image(tmp_path / "outside.JPG")  # exists: refusal is not a missing file
    _image(tmp_path / "outside.png")
    value = str(outside) if value == "ABSOLUTE" else value

    def edit(rows: list[list[str]]) -> None:
        rows[_row_of(rows, "Anomaly/001.JPG")][column] = value

    path = _rewrite_split(root, edit)
    field = "image" if column == 3 else "mask"
    with pytest.raises(
        BenchError,
        match=rf"^{esc(path)} line \d+: {field} '{esc(value)}' is absolute or climbs out",
    ):
        VisA(root).train("candle")


def test_visa_bad_split_files(tmp_path: Path) -> None:
    root = make_visa(tmp_path)
    path = root / "split_csv" / "1cls.csv"
    path.unlink()
    with pytest.raises(BenchError, match=f"^{esc(path)}: missing VisA split file"):
        VisA(root).available_categories()
    with pytest.raises(BenchError, match=f"{esc(tmp_path / 'nope')}: missing folder"):
        VisA(tmp_path / "nope").train("candle")
    with pytest.raises(BenchError, match="pass --data-root with the extracted VisA archive"):
        VisA(None)

    path.write_text("object,split,label,image\r\ncandle,train,normal,x.JPG\r\n")
    with pytest.raises(BenchError, match=f"^{esc(path)}: header is 'object,split,label,image'"):
        VisA(root).train("candle")

    def relabel(label: str, split: str = "test"):
        def edit(rows: list[list[str]]) -> None:
            row = rows[_row_of(rows, "Anomaly/000.JPG")]
            row[1], row[2] = split, label

        return edit

    root = make_visa(tmp_path / "b")
    path = _rewrite_split(root, relabel("bad"))
    with pytest.raises(BenchError, match=rf"^{esc(path)} line \d+: split 'test', label 'bad'"):
        VisA(root).test("candle")
    root = make_visa(tmp_path / "c")
    path = _rewrite_split(root, relabel("anomaly", "train"))
    with pytest.raises(BenchError, match=rf"{esc(path)} line \d+: an anomalous training image"):
        VisA(root).train("candle")
    # the header and 7 rows come first, so an extra row is line 9
    root = make_visa(tmp_path / "d", extra_rows=[["candle", "test", "anomaly", "x.JPG", ""]])
    path = root / "split_csv" / "1cls.csv"
    with pytest.raises(BenchError, match=f"{esc(path)} line 9: anomalous image x.JPG has no mask"):
        VisA(root).test("candle")
    root = make_visa(tmp_path / "e", extra_rows=[["candle", "test", "normal"]])
    with pytest.raises(BenchError, match=f"{esc(root / 'split_csv/1cls.csv')} line 9: 3 fields"):
        VisA(root).test("candle")


def test_visa_missing_files(tmp_path: Path) -> None:
    root = make_visa(tmp_path)
    image = root / "candle/Data/Images/Normal/0001.JPG"
    image.unlink()
    split = esc(root / "split_csv/1cls.csv")
    with pytest.raises(BenchError, match=rf"^{esc(image)}: image listed in {split} line \d+ not"):
        VisA(root).train("candle")
    with pytest.raises(BenchError, match=f"^{esc(image)}: image listed"):
        VisA(root).test("candle")  # a category's files are checked together
    _image(image)
    mask = root / "candle/Data/Masks/Anomaly/001.png"
    mask.unlink()
    with pytest.raises(BenchError, match=rf"^{esc(mask)}: mask listed in {split} line \d+ not"):
        VisA(root).test("candle")


def test_visa_reads_the_split_file_once(tmp_path: Path) -> None:
    root = make_visa(tmp_path)
    ds = VisA(root)
    assert len(ds.train("candle")) == 3
    (root / "split_csv" / "1cls.csv").write_text("garbage")
    assert len(ds.test("candle")) == 4


# ---- Real-IAD ---------------------------------------------------------------------------------


def _realiad_name(category: str, sample: int, kind: str, view: int) -> str:
    return f"{category}_{sample:04d}_{kind}_C{view}_20230922"


def make_realiad(
    root: Path,
    category: str = "audiojack",
    json_dir: str = "realiad_jsons",
    on: int = 255,
    views: int = 2,
) -> Path:
    """``realiad_1024/<category>/{OK,NG/<class>}/S<id>/<name>_C<view>_*.jpg`` with masks
    beside the NG views, and ``<json_dir>/<category>.json`` as the authors' loader reads it.

    Training: samples 1-2 (OK). Test: sample 3 (OK), sample 4 (AK) whose view 2 has a null
    mask, and sample 5 (HS, a mask for every view)."""
    images = root / "realiad_1024" / category
    train, test = [], []

    def add(split: list, sample: int, cls: str, view: int, with_mask: bool) -> None:
        kind = "OK" if cls == "OK" else "NG"
        folder = f"OK/S{sample:04d}" if cls == "OK" else f"NG/{cls}/S{sample:04d}"
        stem = _realiad_name(category, sample, kind, view)
        _image(images / folder / f"{stem}.jpg", value=40 * sample + view)
        mask = None
        if with_mask:
            mask = f"{folder}/{stem}.png"
            _mask(images / mask, on=on)
        split.append(
            {
                "category": category,
                "anomaly_class": cls,
                "image_path": f"{folder}/{stem}.jpg",
                "mask_path": mask,
            }
        )

    for view in range(1, views + 1):
        add(train, 1, "OK", view, False)
        add(train, 2, "OK", view, False)
        add(test, 3, "OK", view, False)
        add(test, 4, "AK", view, view == 1)
        add(test, 5, "HS", view, True)
    document = {
        "meta": {"prefix": f"{category}/", "normal_class": "OK", "pre_transform": False},
        "train": train,
        "test": test,
    }
    (root / json_dir).mkdir(parents=True, exist_ok=True)
    (root / json_dir / f"{category}.json").write_text(json.dumps(document, indent=1))
    return root


@pytest.mark.parametrize("on", [255, 1])
def test_realiad_splits(tmp_path: Path, on: int) -> None:
    root = make_realiad(tmp_path, on=on)
    ds = RealIAD(root)
    assert ds.available_categories() == ("audiojack",)
    train = ds.train("audiojack")
    assert [s.name for s in train] == [
        "OK/S0001/audiojack_0001_OK_C1_20230922",
        "OK/S0002/audiojack_0002_OK_C1_20230922",
        "OK/S0001/audiojack_0001_OK_C2_20230922",
        "OK/S0002/audiojack_0002_OK_C2_20230922",
    ]
    assert {(s.label, s.mask, s.defect) for s in train} == {(0, None, "good")}
    images = root / "realiad_1024" / "audiojack"
    assert train[0].image == images / "OK/S0001/audiojack_0001_OK_C1_20230922.jpg"
    test = ds.test("audiojack")
    assert [(s.name.split("/")[-1], s.label, s.defect) for s in test] == [
        ("audiojack_0003_OK_C1_20230922", 0, "good"),
        ("audiojack_0004_NG_C1_20230922", 1, "AK"),
        ("audiojack_0005_NG_C1_20230922", 1, "HS"),
        ("audiojack_0003_OK_C2_20230922", 0, "good"),
        ("audiojack_0004_NG_C2_20230922", 0, "good"),  # no mask: normal, as the authors count
        ("audiojack_0005_NG_C2_20230922", 1, "HS"),
    ]
    assert test[1].mask == images / "NG/AK/S0004/audiojack_0004_NG_C1_20230922.png"
    assert test[4].mask is None
    masks = _native_masks(test)
    assert np.array_equal(masks[5], _expected_mask()) and not masks[4].any()


def test_realiad_lists_without_decoding_and_parses_once(tmp_path: Path) -> None:
    root = make_realiad(tmp_path, json_dir="realiad_jsons/realiad_jsons")  # nested extraction
    for image in (root / "realiad_1024").rglob("*.jpg"):
        image.write_bytes(b"not decoded while listing")
    ds = RealIAD(root)
    train = ds.train("audiojack")
    (root / "realiad_jsons" / "realiad_jsons" / "audiojack.json").write_text("{broken")
    test = ds.test("audiojack")
    assert len(train) == 4 and len(test) == 6
    with pytest.raises(BenchError, match=f"{esc(test[0].image)}: unreadable image"):
        read_image(test[0].image)


def test_realiad_categories(tmp_path: Path) -> None:
    for category in ("zipper", "my_part", "audiojack"):
        make_realiad(tmp_path, category)
    ds = RealIAD(tmp_path)
    assert ds.available_categories() == ("audiojack", "zipper", "my_part")
    assert len(ds.test("my_part")) == 6
    with pytest.raises(
        BenchError, match="unknown realiad category 'pcb'; known: audiojack, zipper"
    ):
        ds.train("pcb")


def _edit_realiad(root: Path, edit) -> Path:
    path = root / "realiad_jsons" / "audiojack.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    ("where", "field", "value"),
    [
        ("test[2]", "image_path", "../../outside.jpg"),
        ("test[2]", "image_path", "NG/HS/../../../../outside.jpg"),
        ("test[2]", "image_path", "ABSOLUTE"),
        ("train[0]", "image_path", "..\\..\\outside.jpg"),
        ("test[2]", "mask_path", "../../outside.png"),
        ("test[2]", "mask_path", "ABSOLUTE"),
        ("meta", "prefix", "../"),
    ],
)
def test_realiad_refuses_paths_outside_the_root(
    tmp_path: Path, where: str, field: str, value: str
) -> None:
    root = make_realiad(tmp_path / "Real-IAD")
    outside = _image(tmp_path / "outside.jpg")  # exists: refusal is not a missing file
    value = str(outside) if value == "ABSOLUTE" else value

    def edit(document: dict) -> None:
        if where == "meta":
            document["meta"][field] = value
        else:
            split, index = where.rstrip("]").split("[")
            document[split][int(index)][field] = value

    path = _edit_realiad(root, edit)
    with pytest.raises(
        BenchError, match=f"^{esc(path)} {esc(where)}: {field} '{esc(value)}' is absolute"
    ):
        RealIAD(root).test("audiojack")


def test_realiad_bad_files(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match=f"^{esc(tmp_path)}: no Real-IAD split files; expected"):
        RealIAD(tmp_path).available_categories()
    with pytest.raises(BenchError, match=r"pass --data-root with the Real-IAD folder"):
        RealIAD(None)
    root = make_realiad(tmp_path)
    path = root / "realiad_jsons" / "audiojack.json"
    path.write_text("{not json")
    with pytest.raises(BenchError, match=f"^{esc(path)}: unreadable Real-IAD split file"):
        RealIAD(root).train("audiojack")
    path.write_text(json.dumps({"meta": {}, "train": []}))
    with pytest.raises(BenchError, match=f"^{esc(path)}: not a Real-IAD split file"):
        RealIAD(root).train("audiojack")
    path.write_text(json.dumps({"meta": {}, "train": [], "test": []}))
    with pytest.raises(BenchError, match=f"^{esc(path)}: the 'train' list is empty"):
        RealIAD(root).train("audiojack")

    root = make_realiad(tmp_path / "b")
    path = _edit_realiad(root, lambda d: d["test"][1].pop("anomaly_class"))
    with pytest.raises(BenchError, match=rf"^{esc(path)} test\[1\]: expected an entry"):
        RealIAD(root).test("audiojack")
    root = make_realiad(tmp_path / "c")
    path = root / "realiad_jsons" / "audiojack.json"
    image = root / "realiad_1024/audiojack/NG/HS/S0005/audiojack_0005_NG_C2_20230922.jpg"
    image.unlink()
    with pytest.raises(BenchError, match=rf"^{esc(image)}: image listed in {esc(path)} test\[5\]"):
        RealIAD(root).test("audiojack")
    mask = root / "realiad_1024/audiojack/NG/AK/S0004/audiojack_0004_NG_C1_20230922.png"
    mask.unlink()
    with pytest.raises(BenchError, match=rf"^{esc(mask)}: mask listed in {esc(path)} test\[1\]"):
        RealIAD(root).test("audiojack")
    shutil.rmtree(root / "realiad_1024" / "audiojack")
    with pytest.raises(
        BenchError, match=f"{esc(root / 'realiad_1024/audiojack')}: missing folder .*audiojack"
    ):
        RealIAD(root).train("audiojack")
    shutil.rmtree(root / "realiad_1024")
    with pytest.raises(BenchError, match=f"{esc(root / 'realiad_1024')}: missing folder"):
        RealIAD(root).train("audiojack")


def test_realiad_empty_prefix_joins_nothing(tmp_path: Path) -> None:
    root = make_realiad(tmp_path)

    def edit(document: dict) -> None:
        document["meta"]["prefix"] = ""
        for entry in document["train"] + document["test"]:
            for key in ("image_path", "mask_path"):
                if entry[key]:
                    entry[key] = f"audiojack/{entry[key]}"

    _edit_realiad(root, edit)
    test = RealIAD(root).test("audiojack")
    assert [s.label for s in test] == [0, 1, 1, 0, 0, 1]
    assert (
        test[1].mask
        == root / "realiad_1024/audiojack/NG/AK/S0004/audiojack_0004_NG_C1_20230922.png"
    )


def test_realiad_meta_defaults(tmp_path: Path) -> None:
    """Without meta, paths are under the category folder and 'OK' is the normal class; an
    empty mask path counts as none."""
    root = make_realiad(tmp_path)

    def edit(document: dict) -> None:
        del document["meta"]
        document["test"][1]["mask_path"] = ""

    _edit_realiad(root, edit)
    test = RealIAD(root).test("audiojack")
    assert [s.label for s in test] == [0, 0, 1, 0, 0, 1]
    assert test[0].image.parent == root / "realiad_1024" / "audiojack" / "OK" / "S0003"


# ---- listing ----------------------------------------------------------------------------------


def test_bench_list_shows_the_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    listed = dict(
        line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line
    )
    assert listed["visa"].split(", ") == list(VisA.categories) and len(VisA.categories) == 12
    assert listed["visa"].startswith("candle, capsules, cashew, chewinggum, fryum, macaroni1")
    assert (
        listed["mpdd"]
        == "bracket_black, bracket_brown, bracket_white, connector, metal_plate, tubes"
    )
    assert (
        listed["mvtec_ad2"]
        == "can, fabric, fruit_jelly, rice, sheet_metal, vial, wallplugs, walnuts"
    )
    realiad = listed["realiad"].split(", ")
    assert len(realiad) == 30 and realiad[:2] == ["audiojack", "bottle_cap"]


# ---- the real photographs: VisA layout and MVTec layout give the same run -----------------------


def _bottle_in_both_layouts(source: Path, out: Path) -> tuple[Path, Path]:
    """A few real bottle photographs, saved once as JPEG (VisA's format), then placed in a
    VisA tree with its split file and in an MVTec tree: the same bytes in both."""
    visa, mvtec = out / "visa", out / "mvtec"
    rows = [VISA_HEADER]
    picks = [("train", "good", i) for i in range(4)]
    picks += [("test", "good", i) for i in range(2)]
    picks += [("test", "broken_large", i) for i in range(2)]
    picks += [("test", "contamination", i) for i in range(2)]
    for n, (split, defect, i) in enumerate(picks):
        photo = source / split / defect / f"{i:03d}.png"
        folder = "Normal" if defect == "good" else "Anomaly"
        rel = f"bottle/Data/Images/{folder}/{n:04d}.JPG"
        (visa / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(photo).convert("RGB").save(visa / rel, quality=95)
        target = mvtec / "bottle" / split / defect / f"{n:04d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(visa / rel, target)
        mask_rel = ""
        if defect != "good":
            mask_rel = f"bottle/Data/Masks/Anomaly/{n:04d}.png"
            real_mask = source / "ground_truth" / defect / f"{i:03d}_mask.png"
            (visa / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            binary = (np.asarray(Image.open(real_mask)) > 0).astype(np.uint8)
            Image.fromarray(binary).save(visa / mask_rel)  # VisA's 0/1 convention
            mvtec_mask = mvtec / "bottle" / "ground_truth" / defect / f"{n:04d}_mask.png"
            mvtec_mask.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(real_mask, mvtec_mask)  # MVTec's 0/255
        rows.append(["bottle", split, "normal" if defect == "good" else "anomaly", rel, mask_rel])
    (visa / "split_csv").mkdir()
    with (visa / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return visa, mvtec


def _run(dataset: str, root: Path, out: Path) -> dict[str, str]:
    argv = ["run", "--methods", "padim", "--dataset", dataset, "--data-root", str(root)]
    argv += ["--categories", "bottle", "--weights", "random", "--input-size", "64"]
    assert main([*argv, "--out", str(out), "--no-profile"]) == 0
    with (out / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    return row


def test_visa_layout_scores_like_mvtec_layout(shared_mvtec: Path, tmp_path: Path) -> None:
    visa, mvtec = _bottle_in_both_layouts(shared_mvtec / "bottle", tmp_path / "data")
    from_visa = _run("visa", visa, tmp_path / "run_visa")
    from_mvtec = _run("mvtec", mvtec, tmp_path / "run_mvtec")
    assert (from_visa["n_train"], from_visa["n_test"], from_visa["n_anomalous"]) == ("4", "6", "4")
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert from_visa[metric] == from_mvtec[metric], metric
    assert 0.0 <= float(from_visa["image_auroc"]) <= 1.0
