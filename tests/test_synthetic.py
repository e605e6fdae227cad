"""The synthetic dataset: deterministic, exact masks, disjoint texture regions, safe caching."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.datasets import synthetic
from bench.datasets.pipeline import Preprocess, load_ground_truth
from bench.datasets.synthetic import (
    CATEGORIES,
    FOLDER_NAME,
    MANIFEST,
    OBJECTS,
    TEXTURE_TINTS,
    Synthetic,
    add_defect,
    defect_kinds,
    ensure_generated,
    is_complete,
    render_normal,
    sample_rng,
    texture_quadrants,
)
from bench.errors import BenchError


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full dataset, generated once for this module."""
    return ensure_generated(tmp_path_factory.mktemp("synthetic") / FOLDER_NAME)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_layout_sizes_and_masks(generated: Path) -> None:
    ds = Synthetic(generated)
    assert ds.available_categories() == CATEGORIES
    assert len(CATEGORIES) >= 5 and len(OBJECTS) >= 2 and len(TEXTURE_TINTS) >= 3
    assert len({k for c in CATEGORIES for k in defect_kinds(c)}) >= 3
    for category in CATEGORIES:
        train, test = ds.train(category), ds.test(category)
        assert len(train) == 40 and len(test) == 24
        assert sum(s.label for s in test) == 16
        assert {s.defect for s in test} == {"good", *defect_kinds(category)}
        for sample in test:
            image = _load(sample.image)  # type: ignore[arg-type]
            assert image.shape == (256, 256, 3) and image.dtype == np.uint8
            if sample.mask is not None:
                mask = _load(sample.mask)
                assert set(np.unique(mask)) == {0, 255} and (mask > 0).sum() >= 40


def test_reads_through_the_shared_pipeline(generated: Path) -> None:
    test = Synthetic(generated).test("washer")
    gt = load_ground_truth(test, Preprocess((64, 64)), has_masks=True)
    assert gt.masks is not None and gt.masks.shape == (24, 64, 64)
    assert all(gt.masks[i].any() == bool(s.label) for i, s in enumerate(test))


def test_deterministic(generated: Path, tmp_path: Path) -> None:
    """A second generation of a texture and an object category is byte-identical."""
    for category in ("brick", "gelcap"):
        synthetic._write_category(tmp_path, category)
        again = _files(tmp_path / category)
        assert again == _files(generated / category)


@pytest.mark.parametrize("category", CATEGORIES)
def test_masks_are_exactly_the_changed_pixels(generated: Path, category: str) -> None:
    """Regenerate each kind's first defective image: it matches the file, and only masked pixels changed."""
    kinds = defect_kinds(category)
    for i, kind in enumerate(kinds):
        rng = sample_rng(category, "test_defective", i)
        normal = render_normal(category, "test", rng)
        image, mask = add_defect(normal, kind, rng)
        assert np.array_equal((image != normal.image).any(-1), mask)
        assert mask.sum() >= 40
        assert np.array_equal(_load(generated / category / "test" / kind / "000.png"), image)
        assert np.array_equal(
            _load(generated / category / "ground_truth" / kind / "000_mask.png") > 0, mask
        )
        assert np.abs(image.astype(int) - normal.image)[mask].max() >= 40  # clearly visible


def _overlaps(a: list[int], b: list[int]) -> bool:
    (ta, la, ha, wa), (tb, lb, hb, wb) = a, b
    return ta < tb + hb and tb < ta + ha and la < lb + wb and lb < la + wa


def test_texture_train_and_test_come_from_disjoint_photo_regions(generated: Path) -> None:
    manifest = json.loads((generated / MANIFEST).read_text())
    assert texture_quadrants("train") and not set(texture_quadrants("train")) & set(
        texture_quadrants("test")
    )
    for category in TEXTURE_TINTS:
        records = [r for r in manifest["files"] if r["file"].startswith(f"{category}/")]
        train = [r["box"] for r in records if "/train/" in r["file"]]
        test = [r["box"] for r in records if "/test/" in r["file"]]
        assert len(train) == 40 and len(test) == 24
        assert not any(_overlaps(a, b) for a in train for b in test)
    # The recorded box is where the pixels really came from.
    record = next(r for r in manifest["files"] if r["file"] == "gravel/train/good/000.png")
    top, left, h, w = record["box"]
    crop = synthetic._photo("gravel")[top : top + h, left : left + w]
    crop = crop[:, ::-1] if record["flip"][0] else crop
    crop = crop[::-1] if record["flip"][1] else crop
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((256, 256)), float)
    actual = _load(generated / record["file"]).mean(-1)
    assert np.corrcoef(expected.ravel(), actual.ravel())[0, 1] > 0.95


def test_default_folder_is_in_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOWAD_CACHE", str(tmp_path))
    ds = Synthetic(None)
    assert ds.root == tmp_path / FOLDER_NAME
    assert not ds.root.exists()  # generated on first use, not on construction


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-category, few-image generator, for the cache behaviour tests."""
    monkeypatch.setattr(synthetic, "CATEGORIES", ("brick", "washer"))
    monkeypatch.setattr(synthetic, "N_TRAIN", 2)
    monkeypatch.setattr(synthetic, "N_TEST_GOOD", 1)
    monkeypatch.setattr(synthetic, "N_TEST_DEFECTIVE", 4)


@pytest.mark.usefixtures("tiny")
def test_generated_once_and_regenerated_when_incomplete(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = ensure_generated(tmp_path / "data")
    assert is_complete(folder) and Synthetic(folder).available_categories() == ("brick", "washer")
    (folder / "washer" / "test" / "missing" / "000.png").unlink()
    (folder / "brick" / "train" / "good" / "001.png").write_bytes(b"truncated")
    assert not is_complete(folder)
    ensure_generated(folder)
    assert is_complete(folder) and (folder / "washer" / "test" / "missing" / "000.png").is_file()

    def fail(out: Path) -> None:
        raise AssertionError("a complete folder must not be regenerated")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert ensure_generated(folder) == folder
    assert Synthetic(folder).train("brick")


@pytest.mark.usefixtures("tiny")
def test_interrupted_generation_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write = synthetic._write_category

    def interrupted(out: Path, category: str) -> list[dict[str, object]]:
        if category == "washer":
            raise KeyboardInterrupt
        return write(out, category)

    monkeypatch.setattr(synthetic, "_write_category", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_generated(tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BenchError, match=f"{re.escape(str(tmp_path))}: exists but is not"):
        Synthetic(tmp_path).train("brick")
    assert (tmp_path / "notes.txt").read_text() == "mine"
