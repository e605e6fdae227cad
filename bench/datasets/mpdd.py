"""MPDD (Metal Parts Defect Detection) in its original layout, which is MVTec AD's.

``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect>/*.png`` and
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``; masks are 0/255.
"""

from __future__ import annotations

from bench.datasets.mvtec import MVTec
from bench.registry import DATASETS

MPDD_CATEGORIES = (
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
)


@DATASETS.register("mpdd")
class MPDD(MVTec):
    """MPDD: six metal parts under varying light and pose, read by the MVTec AD loader."""

    name = "mpdd"
    categories = MPDD_CATEGORIES
