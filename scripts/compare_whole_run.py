"""Whole-process cost of `bench run` against an anomalib 2.7 script doing the same work (a benchmark).

Each side is one fresh interpreter, timed from outside: interpreter start, imports, data
loading, fit, test, metrics and (for bench) the report, tables and figures. Per process
it records wall time, CPU time (user + system, its waited-for children included) and
peak resident memory, from ``os.wait4``. Runs go in pairs, the two sides alternating
which starts first; the table gives medians and the median of the per-pair ratios.

Work per method, on the first ``--train-images`` normal training images and the test
images of one MVTec-layout category (copied to a temporary folder):
- bench: ``bench run --methods M --dataset mvtec --weights random --no-profile
  --reference anomalib`` with the epochs and batch size below, ``--threads`` torch threads;
- anomalib: ``Engine(max_epochs=E, limit_val_batches=0, num_sanity_val_steps=0).fit``,
  then ``Engine.test`` (validation off; no visualiser unless ``--anomalib-visualizer``).
Both sides load images with ``--workers`` processes and use random backbone weights, on
``--device`` (``cuda``: bench's ``--device cuda``, anomalib's GPU accelerator; the GPU is
named in the output). Bench's own phase times (features, fit, test, metrics) are read from
each run's results.csv, and the table gives what the process spent outside them.

    python scripts/compare_whole_run.py --data-root DATA \\
        --anomalib-python ANOMALIB_PYTHON --repeats 3 --markdown whole_run.md
Smoke test (one pair, small data):
    python scripts/compare_whole_run.py --data-root ... --anomalib-python ... --repeats 1 \\
        --methods padim --train-images 8 --test-per-defect 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from comparison_data import subset_folder

# What each compared method runs with on both sides.
METHODS = {
    "fastflow-3x3": {
        "backbone": "resnet18",
        "epochs": 5,
        "batch_size": 32,
        "anomalib": "Fastflow(backbone='resnet18', pre_trained=False, conv3x3_only=True, "
        "pre_processor=Fastflow.configure_pre_processor(image_size=SIZE), visualizer=VIS)",
        "import": "Fastflow",
    },
    "cflow": {
        "backbone": "wide_resnet50_2",
        "epochs": 1,
        "batch_size": 32,
        "anomalib": "Cflow(backbone='wide_resnet50_2', pre_trained=False, "
        "pre_processor=Cflow.configure_pre_processor(image_size=SIZE), visualizer=VIS)",
        "import": "Cflow",
    },
    "padim": {
        "backbone": "resnet18",
        "epochs": 1,
        "batch_size": 32,
        "anomalib": "Padim(backbone='resnet18', pre_trained=False, "
        "pre_processor=Padim.configure_pre_processor(image_size=SIZE), visualizer=VIS)",
        "import": "Padim",
    },
}

ANOMALIB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import {import_name}

    SIZE = (cfg["input_size"], cfg["input_size"])
    VIS = cfg["visualizer"]
    datamodule = MVTecAD(
        root=cfg["root"],
        category=cfg["category"],
        train_batch_size=cfg["batch_size"],
        eval_batch_size=32,
        num_workers=cfg["workers"],
    )
    model = {constructor}
    engine = Engine(
        max_epochs=cfg["epochs"],
        accelerator=cfg["accelerator"],
        devices=1,
        default_root_dir=cfg["workdir"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        logger=False,
    )
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    print("RESULT " + json.dumps({{k: float(v) for k, v in metrics.items()}}))
    """
)


@dataclass(frozen=True)
class Usage:
    """One process, measured from outside."""

    wall: float  # seconds
    cpu: float  # user + system seconds, children it waited for included
    peak_rss_mib: float


PHASES = ("feature_seconds", "fit_seconds", "test_seconds", "metric_seconds")


def bench_phases(run_folder: Path) -> dict[str, float]:
    """The phase timings bench wrote into the run's results.csv (summed over its rows), so
    the part of the whole process spent outside them (start-up, loading, report) shows."""
    path = run_folder / "results.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {p: sum(float(r[p]) for r in rows if r.get(p)) for p in PHASES}


def run_measured(command: list[str], log: Path, env: dict[str, str]) -> Usage:
    """Run ``command`` to completion; its output goes to ``log``; raise if it fails."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({proc.returncode}):\n{tail}")
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024 if sys.platform.startswith("linux") else 1 / 1024**2
    return Usage(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * scale)


def cpu_description() -> dict[str, str]:
    """The CPU model and the vector extensions the kernels can use."""
    model, flags = platform.processor() or "unknown", []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "x86_64", ""):
                model = value.strip()
            if key.strip() == "flags":
                flags = value.split()
                break
    vector = [f for f in flags if f in ("fma", "avx2") or f.startswith(("avx512", "amx"))]
    return {
        "model": model,
        "cores": str(os.cpu_count()),
        "vector extensions": " ".join(vector) or "none listed",
    }


def gpu_description() -> str:
    """The GPU model and driver as nvidia-smi reports them (torch stays unimported here)."""
    try:
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi did not answer)"
    return answer.stdout.strip().splitlines()[0]


def bench_command(args: argparse.Namespace, method: str, root: Path, out: Path) -> list[str]:
    spec = METHODS[method]
    return [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        "--methods",
        method,
        "--dataset",
        "mvtec",
        "--data-root",
        str(root),
        "--categories",
        args.category,
        "--backbone",
        spec["backbone"],
        "--reference",
        "anomalib",
        "--weights",
        "random",
        "--input-size",
        str(args.input_size),
        "--epochs",
        str(spec["epochs"]),
        "--batch-size",
        str(spec["batch_size"]),
        "--threads",
        str(args.threads),
        "--workers",
        str(args.workers),
        "--seeds",
        str(args.seed),
        "--device",
        args.device,
        "--no-profile",
        "--out",
        str(out),
    ]


def anomalib_command(args: argparse.Namespace, method: str, root: Path, workdir: Path) -> list[str]:
    spec = METHODS[method]
    script = workdir / f"anomalib_{method.replace('-', '_')}.py"
    script.write_text(
        ANOMALIB_SCRIPT.format(import_name=spec["import"], constructor=spec["anomalib"])
    )
    cfg = {
        "root": str(root),
        "category": args.category,
        "input_size": args.input_size,
        "epochs": spec["epochs"],
        "batch_size": spec["batch_size"],
        "threads": args.threads,
        "workers": args.workers,
        "accelerator": "gpu" if args.device == "cuda" else "cpu",
        "seed": args.seed,
        "visualizer": bool(args.anomalib_visualizer),
        "workdir": str(workdir / "anomalib-out"),
    }
    return [args.anomalib_python, str(script), json.dumps(cfg)]


def compare(args: argparse.Namespace, method: str, root: Path, tmp: Path) -> dict:
    """``--repeats`` alternating pairs of one method; every measurement and the medians."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # glibc's own variables for what bench's runner sets with mallopt (bench/runner/heap.py).
    kept_env = {**env, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    pairs, phases = [], []
    for repeat in range(args.repeats):
        results = {}
        order = ("bench", "anomalib") if repeat % 2 == 0 else ("anomalib", "bench")
        for side in order:
            work = tmp / f"{method}-{side}-{repeat}"
            work.mkdir()
            if side == "bench":
                command = bench_command(args, method, root, work / "run")
            else:
                command = anomalib_command(args, method, root, work)
            side_env = env if side == "bench" or not args.anomalib_keep_freed else kept_env
            results[side] = run_measured(command, work / "log.txt", side_env)
            if side == "bench":
                phases.append(bench_phases(work / "run"))
            shutil.rmtree(work / "run", ignore_errors=True)
            shutil.rmtree(work / "anomalib-out", ignore_errors=True)
            print(f"  {method} {repeat + 1}/{args.repeats} {side}: {results[side]}", flush=True)
        pairs.append(results)

    def median(side: str, field: str) -> float:
        return statistics.median(getattr(p[side], field) for p in pairs)

    ratios = [p["bench"].wall / p["anomalib"].wall for p in pairs]
    return {
        "method": method,
        "pairs": [{k: vars(v) for k, v in p.items()} for p in pairs],
        "bench_phases": phases,
        "bench_phase_medians": {
            p: statistics.median(ph[p] for ph in phases) for p in PHASES if all(phases)
        },
        "medians": {
            side: {f: median(side, f) for f in ("wall", "cpu", "peak_rss_mib")}
            for side in ("bench", "anomalib")
        },
        "wall_ratio_median": statistics.median(ratios),
        "wall_ratio_range": (min(ratios), max(ratios)),
    }


def markdown(rows: list[dict], cpu: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} cores, vector extensions: "
        f"{cpu['vector extensions']}; "
        + (f"GPU: {cpu['gpu']} (both sides on CUDA); " if "gpu" in cpu else "")
        + f"{args.threads} torch threads, {args.workers} loader "
        f"worker(s); {args.train_images} train images of `{args.category}`, "
        f"{'all' if args.test_per_defect is None else args.test_per_defect} test images per "
        f"folder; medians of {args.repeats} alternating pair(s)"
        + (
            "; anomalib with freed memory kept, as bench's runner does."
            if args.anomalib_keep_freed
            else "."
        ),
        "",
        "| method (backbone, epochs) | bench wall (s) | anomalib wall (s) | wall ratio "
        "(range) | bench CPU (s) | anomalib CPU (s) | bench peak RSS (MiB) "
        "| anomalib peak RSS (MiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        spec, b, a = METHODS[row["method"]], row["medians"]["bench"], row["medians"]["anomalib"]
        low, high = row["wall_ratio_range"]
        lines.append(
            f"| {row['method']} ({spec['backbone']}, {spec['epochs']}) | {b['wall']:.1f} "
            f"| {a['wall']:.1f} | {row['wall_ratio_median']:.2f} ({low:.2f}-{high:.2f}) "
            f"| {b['cpu']:.1f} | {a['cpu']:.1f} | {b['peak_rss_mib']:.0f} "
            f"| {a['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "Where bench's wall time goes (medians; `rest` is start-up, image loading for the "
        "test set's masks, the report and figures):",
        "",
        "| method | features (s) | fit (s) | test (s) | metrics (s) | rest (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        phases = row["bench_phase_medians"]
        if not phases:
            continue
        rest = row["medians"]["bench"]["wall"] - sum(phases.values())
        cells = " | ".join(f"{phases[p]:.1f}" for p in PHASES)
        lines.append(f"| {row['method']} | {cells} | {rest:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="MVTec-layout folder")
    parser.add_argument("--anomalib-python", required=True, help="python with anomalib 2.7")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
    parser.add_argument("--train-images", type=int, default=40)
    parser.add_argument("--test-per-defect", type=int, default=None, help="default: all")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs per method")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--workers", type=int, default=min(4, (os.cpu_count() or 1) // 2))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="both sides")
    parser.add_argument("--anomalib-visualizer", action="store_true")
    parser.add_argument(
        "--anomalib-keep-freed",
        action="store_true",
        help="run anomalib with glibc set as bench's runner sets it (freed memory kept in the "
        "process: MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ at its maximum), to see how much "
        "of the ratio is that setting",
    )
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    cpu = cpu_description()
    if args.device == "cuda":
        cpu["gpu"] = gpu_description()
    print(
        f"CPU {cpu['model']} ({cpu['cores']} cores), vector extensions: {cpu['vector extensions']}"
        + (f"; GPU {cpu['gpu']}" if "gpu" in cpu else "")
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="whole-run-") as tmp_name:
        tmp = Path(tmp_name)
        root = subset_folder(
            args.data_root, args.category, args.train_images, args.test_per_defect, tmp / "data"
        )
        for method in methods:
            rows.append(compare(args, method, root, tmp))
    table = markdown(rows, cpu, args)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(
            json.dumps({"cpu": cpu, "rows": rows, "args": vars(args)}, default=str)
        )


if __name__ == "__main__":
    main()
