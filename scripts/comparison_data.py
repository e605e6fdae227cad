"""What the side-by-side scripts share: the data subset both sides read, running a side in
its own interpreter, and a CUDA sync.

No torch or bench plugin is imported here, so the whole-process timer stays light.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.datasets.base import list_images

RESULT = "RESULT "  # what a side's process prints before the JSON of its figures


def subset_folder(
    data_root: Path,
    category: str,
    train: int,
    test_per_defect: int | None,
    root: Path | None = None,
) -> Path:
    """An MVTec-layout copy of one category under ``root`` (a new temporary folder when
    None): the first ``train`` normal training images, and the test images with their
    masks, ``test_per_defect`` per folder when given. Copies, not links: anomalib refuses
    files that resolve outside its dataset root."""
    root = Path(tempfile.mkdtemp(prefix="anomalib-compare-")) if root is None else root
    source, target = data_root / category, root / category
    (target / "train" / "good").mkdir(parents=True)
    for path in list_images(source / "train" / "good")[:train]:
        shutil.copy2(path, target / "train" / "good" / path.name)
    for defect in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        (target / "test" / defect.name).mkdir(parents=True)
        for path in list_images(defect)[:test_per_defect]:
            shutil.copy2(path, target / "test" / defect.name / path.name)
            mask = source / "ground_truth" / defect.name / f"{path.stem}_mask.png"
            if mask.is_file():
                (target / "ground_truth" / defect.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(mask, target / "ground_truth" / defect.name / mask.name)
    return root


def sync(device: Any) -> None:
    """Wait for queued CUDA work, so a timer stops when the work does."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def run_result_process(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``command`` (a side in a fresh interpreter) and return the JSON it printed last
    after ``RESULT``; a failure raises with the end of what it printed."""
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{Path(command[1]).name} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len(RESULT) :])


def run_anomalib_script(
    python: str, source: str, cfg: dict[str, Any], env: dict[str, str] | None = None
) -> dict:
    """Run ``source``, a script for anomalib's interpreter ``python``, with ``cfg`` as its one
    JSON argument, in a new temporary folder (``cfg["workdir"]``, removed afterwards), with
    Python's warnings off; return its ``RESULT`` line's JSON."""
    workdir = Path(tempfile.mkdtemp(prefix="anomalib-side-"))
    try:
        script = workdir / "run_anomalib.py"
        script.write_text(source)
        command = [python, str(script), json.dumps({**cfg, "workdir": str(workdir)})]
        return run_result_process(
            command, {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build_bench_side(
    method_cls: Any,
    backbone: str,
    reference: str,
    settings: Any,
    device: Any,
    seed: int,
    progress: bool,
) -> tuple[Any, Any, Any]:
    """(preprocess, extractor with random weights, method) for one cell, as `bench run`
    builds them. Imports torch only when called, so the whole-process timer stays light."""
    from bench.extractor import FeatureExtractor
    from bench.methods.base import MethodContext

    pre = method_cls.preprocess(backbone, reference, settings)
    extractor = FeatureExtractor(
        backbone,
        method_cls.needs(backbone, settings),
        weights="random",
        provenance=method_cls.weights_provenance(backbone, reference),
        input_size=pre.output_size,
    ).to(device)
    context = MethodContext(
        backbone=backbone,
        reference=reference,
        channels=dict(extractor.channels),
        shapes=dict(extractor.shapes),
        output_size=pre.output_size,
        device=device,
        seed=seed,
        progress=progress,
    )
    return pre, extractor, method_cls(settings, context)
