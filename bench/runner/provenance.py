"""``run.json``: what ran, with which versions, on which machine, and the history of every
invocation that wrote into the run folder. The one place that writes and reads it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.runner.config import RunConfig

RUN_JSON = "run.json"
# Pillow resizes every image (its filters set the pixel values); libspng decodes PNGs
# bit for bit as PIL does, so pyspng does not change a result and is not listed.
PACKAGES = ("flowad-bench", "torch", "torchvision", "timm", "numpy", "scikit-learn", "pillow")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _hardware(device: str) -> dict[str, Any]:
    import torch  # only writing run.json asks torch; reading it does not

    from bench.kernels import CPU_VENDOR, LINEAR_BACKEND, cpu_workers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_vendor": CPU_VENDOR or None,  # None where the OS does not say
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "linear_backend": LINEAR_BACKEND,  # float32 CPU dense layers (bench.kernels)
        "torch_threads": torch.get_num_threads(),
        # CPU threads a training batch is split over (bench.kernels)
        "cpu_workers": cpu_workers(),
        "device": device,
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_run_json(folder: Path, config: RunConfig, command: str, device: str) -> None:
    """Append this invocation to run.json: command, versions, git revision, hardware."""
    path = folder / RUN_JSON
    history = json.loads(path.read_text()).get("invocations", []) if path.is_file() else []
    history.append(
        {
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": asdict(config),
            "versions": _versions(),
            "git_revision": _git_revision(),
            "hardware": _hardware(device),
        }
    )
    latest = dict(history[-1])
    latest["invocations"] = history
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(latest, indent=2, default=str))
    tmp.replace(path)


def read_run_json(folder: Path) -> dict[str, Any] | None:
    """The latest invocation's record (with the history under ``invocations``), or None."""
    path = Path(folder) / RUN_JSON
    return json.loads(path.read_text()) if path.is_file() else None
