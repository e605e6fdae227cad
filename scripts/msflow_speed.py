"""MSFlow on the CPU: the scoring snapshot and channels-last against the straightforward path.

Side by side in one process, alternating the variants each round, on random features of
the backbone's shapes (untrained flows of the paper's configuration):

- scoring, per image: pooled features -> per-scale log p maps, three ways:
  ``plain`` (the modules on contiguous NCHW tensors, as the authors' code runs),
  ``nhwc`` (the same modules, weights and features channels-last) and ``frozen``
  (``FrozenMSFlow``, what ``predict_batch`` uses);
- a training step (forward, loss, backward, clipped Adam step): NCHW against channels-last.

Prints the median time of each and the ratios to ``plain``; on a busy machine compare
ratios, not times. Example:

    python scripts/msflow_speed.py --backbone wide_resnet50_2 --input-size 256 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.methods.msflow import (
    FrozenMSFlow,
    MSFlowModel,
    MSFlowSettings,
    log_likelihoods,
    msflow_loss,
)

CHANNELS = {"resnet18": [64, 128, 256], "wide_resnet50_2": [256, 512, 1024]}
STRIDES = (4, 8, 16)


def pooled_features(backbone: str, size: int, batch: int, nhwc: bool) -> list[torch.Tensor]:
    """Random features at the pooled grid sizes (half of each backbone stride's grid)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for c, stride in zip(CHANNELS[backbone], STRIDES, strict=True):
        grid = -(-size // stride // 2)
        x = torch.randn(batch, c, grid, grid, generator=gen)
        out.append(x.contiguous(memory_format=torch.channels_last) if nhwc else x)
    return out


def build(backbone: str, nhwc: bool) -> MSFlowModel:
    s = MSFlowSettings()
    torch.manual_seed(0)
    model = MSFlowModel(
        CHANNELS[backbone], s.c_conds, s.parallel_blocks, s.clamp_alpha, torch.Generator()
    )
    return model.to(memory_format=torch.channels_last) if nhwc else model


def train_step(model: MSFlowModel, features: list[torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-6, fused=True)

    def step() -> None:
        latents, log_det = model(features)
        loss = msflow_loss(latents, log_det)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()

    return step


def measure(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, medians: dict[str, float], per: int) -> None:
    base = next(iter(medians.values()))
    print(title)
    for name, value in medians.items():
        print(f"  {name:7s} {1000 * value / per:9.1f} ms per image   x{value / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="wide_resnet50_2", choices=sorted(CHANNELS))
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain, nhwc = build(args.backbone, False).eval(), build(args.backbone, True).eval()
    frozen = FrozenMSFlow(nhwc)
    nchw_in = pooled_features(args.backbone, args.input_size, args.batch, False)
    nhwc_in = pooled_features(args.backbone, args.input_size, args.batch, True)

    def score(model: MSFlowModel, features: list[torch.Tensor]) -> Callable[[], object]:
        return lambda: log_likelihoods(model(features)[0])

    with torch.no_grad():
        want = score(plain, nchw_in)()
        got = frozen(nhwc_in)
        gap = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
        medians = measure(
            {
                "plain": score(plain, nchw_in),
                "nhwc": score(nhwc, nhwc_in),
                "frozen": lambda: frozen(nhwc_in),
            },
            args.rounds,
        )
    label = f"{args.backbone} at {args.input_size}, batch {args.batch}, {args.threads} threads"
    report(f"scoring, {label} (frozen vs plain: max |log p| gap {gap:.1e})", medians, args.batch)
    train = measure(
        {
            "plain": train_step(build(args.backbone, False).train(), nchw_in),
            "nhwc": train_step(build(args.backbone, True).train(), nhwc_in),
        },
        args.rounds,
    )
    report(f"training step, {label}", train, args.batch)


if __name__ == "__main__":
    main()
