"""U-Flow's a-contrario segmentation: a pixel is anomalous where its log10 NFA is below 0.

The NFA (number of false alarms) of a region is the number of tests times the
probability, under the flow's standard normal latents, of a region that unlikely. Two
versions exist:

- ``tree`` (the U-Flow code's ``nfa_tree.py``, the paper's method): per scale, the
  component tree of the upper level sets of mean_c z^2 (4-connected). A region's log10
  probability is its area times the Chernoff bound of a chi-square with C degrees of
  freedom at its smallest sum_c z^2. Chains of nested regions are pruned to their most
  significant region, and a region replaces its children when it is at least as
  significant as all of them, until nothing changes; the surviving leaves give the map.
  Per scale the map is bilinearly upsampled (pixels of no region count 0), the minimum
  over scales is taken, and log10 of the number of tests (every 4-connected region of
  every scale, counted with the polyomino approximation) is added.
- ``binomial`` (anomalib's ``compute_anomaly_mask``, from the U-Flow code's older
  ``nfa_block.py``): per scale, the number of latent values in a window with
  z^2 >= chi2_1(0.5) is tested against a binomial; maps are bicubically upsampled
  (corners aligned) and summed, and log10 of the number of pixels of all scales is added.
  anomalib marks the pixels with log NFA > 0, the complement of the paper's detections;
  we segment log NFA < 0 as the paper does.

The tree is computed in one bottom-up pass over skimage's max-tree instead of the
reference's repeated passes over a networkx graph; the surviving regions are the same.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

LN10 = math.log(10.0)
POLYOMINO_ALPHA = 0.316915  # number of polyominoes of size r ~ alpha * beta^r / r
POLYOMINO_BETA = 4.062570
BINOMIAL_WINDOW = 7  # anomalib's compute_anomaly_mask defaults
BINOMIAL_PROBABILITY = 0.5
EPS = float(np.finfo(float).eps)  # the U-Flow code's mIoU smoothing


class ScaleStats(NamedTuple):
    """What the NFA of one scale needs from a batch of latents (B, C, H, W)."""

    channels: int
    maps: Tensor  # tree: (B, 2, H, W) mean_c and sum_c of z^2; binomial: (B, 1, H, W) counts


def statistics(latents: list[Tensor], kind: str) -> list[ScaleStats]:
    """Per-scale reductions of the latents (finest first), small enough to keep per test set."""
    out = []
    for z in latents:
        z2 = z.float() ** 2
        if kind == "tree":
            maps = torch.stack((z2.mean(dim=1), z2.sum(dim=1)), dim=1)
        else:
            maps = (z2 >= binomial_tau(BINOMIAL_PROBABILITY)).sum(dim=1, keepdim=True).float()
        out.append(ScaleStats(z.shape[1], maps.cpu()))
    return out


def log_nfa(stats: list[ScaleStats], kind: str, size: tuple[int, int]) -> Tensor:
    """log10 NFA per pixel, (B, H, W) at ``size``, from ``statistics`` of one batch."""
    if kind == "tree":
        return _tree_log_nfa(stats, size)
    return _binomial_log_nfa(stats, size)


def overlaps(log_nfa: Tensor, masks: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per image, the pixel counts of intersection and union of the detections
    (log NFA < threshold) with the masks (> 0)."""
    detected = (log_nfa < threshold).flatten(1)
    truth = (masks > 0).flatten(1)
    return (detected & truth).sum(1).double(), (detected | truth).sum(1).double()


def iou_summary(intersection: Tensor, union: Tensor) -> dict[str, float]:
    """Mean per-image IoU (an image with neither detection nor defect counts 1, as in the
    U-Flow code) and the IoU of all pixels pooled."""
    pooled = float(intersection.sum() / union.sum()) if union.sum() > 0 else 1.0
    return {"nfa_miou": float(((intersection + EPS) / (union + EPS)).mean()), "nfa_iou": pooled}


def segmentation_iou(log_nfa: Tensor, masks: Tensor, threshold: float = 0.0) -> dict[str, float]:
    """``iou_summary`` of ``overlaps``: the segmentation's IoUs over a set of images."""
    return iou_summary(*overlaps(log_nfa, masks, threshold))


def log_number_of_tests(region_sizes: list[int]) -> float:
    """log10 of sum over scales of N * sum_{r=1..N} alpha beta^r / r (N pixels per scale):
    every 4-connected region of every size at every position, as float32 like the code."""
    logs = []
    for n in region_sizes:
        r = np.arange(1, n + 1, dtype=np.float64)
        terms = math.log(POLYOMINO_ALPHA) + r * math.log(POLYOMINO_BETA) - np.log(r)
        logs.append(math.log(n) + float(np.logaddexp.reduce(terms)))
    return float(np.float32(float(np.logaddexp.reduce(np.array(logs))) / LN10))


def tree_log_probability(score: np.ndarray, energy: np.ndarray, channels: int) -> np.ndarray:
    """The surviving regions' log10 probabilities as a (H, W) float32 map, NaN elsewhere.

    ``score`` is mean_c z^2 (its upper level sets are the candidate regions), ``energy``
    sum_c z^2 (a region's probability bound uses its minimum).
    """
    from skimage.morphology import max_tree  # imported here: with scipy.stats, about 1 s

    parent, order = max_tree(score, connectivity=1)
    flat, parent = score.ravel(), parent.ravel()
    root = int(order[0])
    # skimage's canonical pixels head the tree's nodes; the others point at theirs.
    is_node = flat != flat[parent]
    is_node[root] = True
    node_of = np.where(is_node, np.arange(flat.size), parent)
    area = np.bincount(node_of, minlength=flat.size).astype(np.float64).tolist()
    low = np.full(flat.size, np.inf)
    np.minimum.at(low, node_of, energy.ravel().astype(np.float64))
    low = low.tolist()
    parents = parent.tolist()
    nodes = order[is_node[order]].tolist()  # parents before children

    log_prob = {}
    # Bottom-up, each node's subtree reduces to one candidate leaf (the node id) or is
    # frozen (-1): it keeps two or more leaves for good.
    kids: dict[int, list[int]] = {}
    reduced: dict[int, int] = {}
    leaves: list[int] = []
    for n in reversed(nodes):
        x = low[n] / channels
        log_prob[n] = (
            area[n] * (-(channels / 2) * (x - 1 - math.log(x)) / LN10) if x > 0 else -math.inf
        )
        below = kids.get(n, [])
        if not below:
            reduced[n] = n
        elif len(below) == 1:
            c = below[0]
            # a chain keeps its most significant region, the lowest one on ties
            reduced[n] = -1 if c < 0 else (n if log_prob[n] < log_prob[c] else c)
        elif all(c >= 0 for c in below) and log_prob[n] <= min(log_prob[c] for c in below):
            reduced[n] = n  # leaves merge into their parent
        else:
            reduced[n] = -1
            leaves.extend(c for c in below if c >= 0)
        if n != root:
            p = parents[n]
            area[p] += area[n]
            low[p] = min(low[p], low[n])
            kids.setdefault(p, []).append(reduced[n])
    if reduced[root] >= 0:
        leaves.append(reduced[root])

    # The reference keys its final regions by log probability: on equal values the
    # region later in tree order wins and the other one's pixels stay empty.
    position = {n: i for i, n in enumerate(nodes)}
    kept = {log_prob[c]: c for c in sorted(leaves, key=position.__getitem__)}
    value = dict.fromkeys(nodes, math.nan)
    for c in kept.values():
        value[c] = log_prob[c]
    for n in nodes[1:]:
        if math.isnan(value[n]):
            value[n] = value[parents[n]]
    table = np.array([value.get(i, math.nan) for i in range(flat.size)])
    return table[node_of].reshape(score.shape).astype(np.float32)


def _tree_log_nfa(stats: list[ScaleStats], size: tuple[int, int]) -> Tensor:
    batch = stats[0].maps.shape[0]
    scales = []
    for s in stats:
        maps = s.maps.numpy()
        per_image = [tree_log_probability(maps[i, 0], maps[i, 1], s.channels) for i in range(batch)]
        log_prob = torch.from_numpy(np.stack(per_image)).nan_to_num(0.0).unsqueeze(1)
        scales.append(F.interpolate(log_prob, size=size, mode="bilinear", align_corners=False))
    sizes = [s.maps.shape[-2] * s.maps.shape[-1] for s in stats]
    return torch.cat(scales, dim=1).amin(dim=1) + log_number_of_tests(sizes)


def binomial_tau(probability: float) -> Tensor:
    """chi2_1 quantile as anomalib computes it: the standard normal's, squared, in float32."""
    normal = torch.distributions.Normal(0.0, 1.0)
    return normal.icdf(torch.tensor((probability + 1) / 2)) ** 2


def _binomial_log_nfa(stats: list[ScaleStats], size: tuple[int, int]) -> Tensor:
    from scipy.stats import binom  # imported here: listing or running other methods skips it

    scales = []
    for scale, s in enumerate(stats):
        half = max(int(BINOMIAL_WINDOW / 2**scale // 2), 1)
        width = 2 * half + 1
        padded = F.pad(s.maps, (half,) * 4, mode="reflect")
        counts = padded.unfold(2, width, 1).unfold(3, width, 1).sum(dim=(-2, -1))
        observed = (counts / s.channels).numpy()
        log_prob = binom.logsf(observed, width**2, 1 - BINOMIAL_PROBABILITY) / LN10
        scales.append(
            F.interpolate(torch.from_numpy(log_prob), size=size, mode="bicubic", align_corners=True)
        )
    pixels = sum(s.maps.shape[-2] * s.maps.shape[-1] for s in stats)
    log_tests = torch.log10(torch.tensor(float(pixels)))  # float32, as anomalib
    return (torch.cat(scales, dim=1).sum(dim=1) + log_tests).float()
