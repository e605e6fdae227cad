"""Whether a finished row still answers its cell: the run folder's store is keyed by the
options as typed, and two of them can mean something else later. ``--weights auto`` falls
back to random initialisation until the ImageNet weights are cached, and a checkpoint path
or a data folder can hold other files than when the row was made. A run checks both
before it skips a finished cell, so it never reports such a row as this command's result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.datasets.base import Dataset, Sample
from bench.extractor import expected_weights_ident
from bench.registry import DATASETS, METHODS
from bench.runner.cell import Cell, data_fingerprint


class _Listings:
    """Each category's splits listed once, however many cells read them."""

    def __init__(self, data_root: str | None) -> None:
        self._root = Path(data_root) if data_root else None
        self._datasets: dict[str, Dataset] = {}
        self._splits: dict[tuple[str, str, str], list[Sample]] = {}

    def split(self, dataset: str, category: str, which: str) -> list[Sample]:
        key = (dataset, category, which)
        if key not in self._splits:
            if dataset not in self._datasets:
                self._datasets[dataset] = DATASETS.get(dataset)(self._root)
            data = self._datasets[dataset]
            data.check_category(category)
            self._splits[key] = data.train(category) if which == "train" else data.test(category)
        return self._splits[key]


def stale_cells(done: list[tuple[Cell, dict[str, Any]]], data_root: str | None) -> list[str]:
    """One line per finished cell whose row no longer matches what it would compute now."""
    listings = _Listings(data_root)
    idents: dict[tuple, str] = {}
    found = []
    for cell, row in done:
        cls = METHODS.get(cell.method)
        layers = cls.needs(cell.backbone, cls.Settings(**cell.settings))
        provenance = cls.weights_provenance(cell.backbone, cell.reference)
        key = (cell.backbone, tuple(layers), cell.weights, provenance)
        if key not in idents:
            idents[key] = expected_weights_ident(cell.backbone, layers, cell.weights, provenance)
        if row.get("weights_id") != idents[key]:
            found.append(
                f"{cell.label()} was made with weights {row.get('weights')}, and --weights "
                f"{cell.weights} now gives {idents[key]}"
            )
            continue
        if not row.get("data_id"):  # a row from before the data was fingerprinted
            continue
        train = [s for c in cell.evaluated for s in listings.split(cell.dataset, c, "train")]
        test = listings.split(cell.dataset, cell.category, "test")
        if data_fingerprint(train, test) != row["data_id"]:
            found.append(
                f"{cell.label()} was made from other images ({row.get('n_train')} training and "
                f"{row.get('n_test')} test images then, {len(train)} and {len(test)} now, or "
                "files changed)"
            )
    return found
