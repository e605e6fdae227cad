"""Peak memory of PaDiM's fit for wide_resnet50_2 at 256 (a benchmark, not a test).

    python scripts/padim_memory.py [--images 209] [--input-size 256]

Fits PaDiM (anomalib reference: no crop, a 64x64 grid, d = 550) on random features of
wide_resnet50_2's layer1-3 shapes, so no backbone or data is needed, and prints the process's
peak RSS before and after the fit next to the size of the final inverse-covariance tensor
(positions x d x d float32) and of the training embeddings (images x d x positions float32),
the two tensors the fit cannot avoid holding.
"""

from __future__ import annotations

import argparse
import resource

import torch

from bench.features import CachedFeatures
from bench.methods.base import MethodContext
from bench.methods.padim import Padim

CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024}
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=209, help="209 = MVTec AD bottle's train set")
    parser.add_argument("--input-size", type=int, default=256)
    args = parser.parse_args()

    size = args.input_size
    shapes = {k: (size // s, size // s) for k, s in STRIDES.items()}
    generator = torch.Generator().manual_seed(0)
    features = {
        k: torch.randn(args.images, c, *shapes[k], generator=generator) for k, c in CHANNELS.items()
    }
    context = MethodContext(
        backbone="wide_resnet50_2",
        reference="anomalib",
        channels=CHANNELS,
        shapes=shapes,
        output_size=(size, size),
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )
    method = Padim(Padim.default_settings("wide_resnet50_2", "anomalib"), context)
    train = CachedFeatures(features, torch.device("cpu"))
    before = peak_rss_gb()
    method.fit(train)
    after = peak_rss_gb()
    model = method.model
    d, positions = model.mean.shape
    inverse = model.inv_covariance.numel() * 4 / 1024**3
    embeddings = args.images * d * positions * 4 / 1024**3
    print(
        f"wide_resnet50_2 at {size}: {args.images} images, d = {d}, {positions} positions\n"
        f"peak RSS before fit {before:.2f} GiB (features {sum(f.numel() for f in features.values()) * 4 / 1024**3:.2f} GiB), "
        f"after fit {after:.2f} GiB\n"
        f"fit added {after - before:.2f} GiB; final inverse covariances {inverse:.2f} GiB, "
        f"training embeddings {embeddings:.2f} GiB"
    )


if __name__ == "__main__":
    main()
