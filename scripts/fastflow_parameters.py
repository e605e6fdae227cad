"""Print FastFlow's trainable-parameter table per backbone (FF-REF settings).

Counts come from the model built on the meta device from known feature shapes, so no
backbone is built and no weights are needed. The paper column is the "additional params"
figure with its status tag from bench/paper/fastflow-ablation.csv and
fastflow-complexity.csv (or why there is none).

    python scripts/fastflow_parameters.py
"""

from __future__ import annotations

import dataclasses

from bench.methods.fastflow import KNOWN_FEATURES, FastFlow, count_trainable

PAPER = {
    "resnet18": "2.7M alternating (S), 4.9M 3x3-only (X)",
    "wide_resnet50_2": "not found",
    "deit_base_distilled_patch16_384": "14.8M (S)",
    "cait_m48_448": "not found",
}


def parameter_table() -> str:
    """The markdown table: flows and LayerNorms, alternating and 3x3-only kernels."""
    rows = [
        "| backbone (input, steps, hidden ratio) | flows, alternating 3/1 | flows, 3x3-only "
        '| LayerNorm | total, alternating | total, 3x3-only | paper "additional params" |',
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for backbone in KNOWN_FEATURES:
        settings = FastFlow.default_settings(backbone, "original")
        alt = count_trainable(backbone, dataclasses.replace(settings, conv3x3_only=False))
        only3 = count_trainable(backbone, dataclasses.replace(settings, conv3x3_only=True))
        label = (
            f"{backbone} ({settings.input_size}, {settings.flow_steps}, {settings.hidden_ratio})"
        )
        cells = [alt["flows"], only3["flows"], alt["norms"], alt["total"], only3["total"]]
        rows.append(
            f"| {label} | " + " | ".join(f"{c:,}" for c in cells) + f" | {PAPER[backbone]} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(parameter_table())
