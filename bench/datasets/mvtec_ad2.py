"""MVTec AD 2 in its original layout.

``<root>/<category>/train/good/*.png``, ``<root>/<category>/validation/good/*.png``,
``<root>/<category>/test_public/{good,bad}/*.png`` and
``<root>/<category>/test_public/ground_truth/bad/<stem>_mask.png``. The public test set is
the one with ground truth, so it is the test split; ``test_private`` and
``test_private_mixed`` (no ground truth) are not read. The validation images are a split
of their own: never part of train or test.
"""

from __future__ import annotations

from bench.datasets.base import Sample
from bench.datasets.mvtec import NORMAL, MVTec
from bench.registry import DATASETS

MVTEC_AD2_CATEGORIES = (
    "can",
    "fabric",
    "fruit_jelly",
    "rice",
    "sheet_metal",
    "vial",
    "wallplugs",
    "walnuts",
)


@DATASETS.register("mvtec_ad2")
class MVTecAD2(MVTec):
    """MVTec AD 2: eight categories; anomalous test images are all in one 'bad' folder."""

    name = "mvtec_ad2"
    categories = MVTEC_AD2_CATEGORIES
    test_dir = "test_public"
    ground_truth_dir = "test_public/ground_truth"
    validation_dir = f"validation/{NORMAL}"

    def validation(self, category: str) -> list[Sample]:
        """The released validation images (normal only), kept apart from train and test."""
        return self._normal_images(self._category_dir(category) / self.validation_dir, "validation")
