"""Every option of a run, defined once: the CLI builds its parsers from this table and the
Python API (``bench.run``) checks its keyword arguments against it, so a flag cannot mean
one thing in ``bench run`` and another in ``bench paper``, ``bench check`` or ``bench speed``.

An option's ``dest`` is a ``RunConfig`` field (or ``set_items`` and ``force``, which the
run takes beside its config). ``commands`` says which subcommands offer it; ``help_for``
rewords the help where a command gives the option a different default.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.registry import METHODS
from bench.runner.config import SHARED_SETTINGS, RunConfig, load_preset, parse_set

QUICK_PRESET = "quick"
RUN, CHECK, PAPER, SPEED, REPORT = "run", "check", "paper", "speed", "report"
GRID = frozenset({RUN, CHECK, PAPER})  # what data, how long, where it runs
CONFIG = frozenset({RUN, CHECK})  # the whole grid description
PROFILED = frozenset({RUN, CHECK, SPEED})


def csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in csv_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got '{text}'"
        ) from exc


@dataclass(frozen=True)
class Option:
    """One command-line flag (and API keyword): where it goes and which commands take it."""

    dest: str
    flags: tuple[str, ...]
    help: str
    commands: frozenset[str]
    type: Callable[[str], Any] | None = None
    action: str | None = None
    metavar: str | None = None
    deprecated: tuple[str, ...] = ()  # old spellings, accepted with a warning for one release
    help_for: dict[str, str] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser, command: str) -> None:
        kwargs: dict[str, Any] = {"dest": self.dest, "help": self.help_for.get(command, self.help)}
        if self.action == "append":
            kwargs.update(action="append", default=[], metavar=self.metavar)
        elif self.action == "store_true":
            kwargs.update(action="store_true")
        elif self.action == "store_false":
            kwargs.update(action="store_const", const=False)
        else:
            kwargs.update(type=self.type, metavar=self.metavar)
        parser.add_argument(*self.flags, **kwargs)
        for old in self.deprecated:
            parser.add_argument(
                old,
                dest=self.dest,
                type=self.type,
                action=_deprecated(self.flags[0]),
                help=argparse.SUPPRESS,
            )


def _deprecated(new: str) -> type[argparse.Action]:
    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None) -> None:
            print(
                f"warning: {option_string} is deprecated and will be removed in the next "
                f"release; use {new}",
                file=sys.stderr,
            )
            setattr(namespace, self.dest, values)

    return Deprecated


OPTIONS: tuple[Option, ...] = (
    Option("methods", ("--methods",), "comma-separated method names (default: every registered one)",
           CONFIG | {SPEED}, csv_list),
    Option("dataset", ("--dataset",), "dataset name (default: synthetic, the embedded one)", CONFIG),
    Option("data_root", ("--data-root",), "the dataset's folder in its original layout", GRID),
    Option("categories", ("--categories",), "comma-separated categories, or 'all' (default)",
           GRID, csv_list),
    Option("backbones", ("--backbones", "--backbone"), "comma-separated timm backbone names",
           CONFIG | {SPEED, PAPER}, csv_list,
           help_for={PAPER: "a subset of the table's backbones; for a one-backbone table, a "
                            "replacement"}),
    Option("seeds", ("--seeds",), "comma-separated seeds (default: 0)", GRID, int_list),
    Option("reference", ("--reference",),
           "original (default) or anomalib: whose defaults a method follows",
           CONFIG | {SPEED, PAPER},
           help_for={PAPER: "original or anomalib (default: the table's; with --from, the run's)"}),
    Option("weights", ("--weights",), "auto (default) | imagenet | random | PATH to a checkpoint",
           CONFIG | {SPEED, PAPER},
           help_for={
               SPEED: "random (default) | auto | imagenet | PATH",
               PAPER: "imagenet (default) | PATH | random or auto with --allow-random-weights",
           }),
    Option("input_size", ("--input-size",),
           "input side in pixels (default: each method's reference)", GRID | {SPEED}, int),
    Option("epochs", ("--epochs",), "training epochs for every method that trains", GRID, int),
    Option("batch_size", ("--batch-size",), "training batch size for every method", GRID, int),
    Option("lr", ("--lr",), "learning rate for every method that trains", GRID, float),
    Option("set_items", ("--set",),
           "override one method setting, e.g. fastflow.conv3x3_only=true (repeatable)",
           GRID | {SPEED}, action="append", metavar="METHOD.KEY=VALUE"),
    Option("setting", ("--setting",),
           "separate (default): a model per category; unified: one model per method, "
           "backbone and seed trained on every chosen category's images, scored per category",
           CONFIG),
    Option("eval_every", ("--eval-every",),
           "also evaluate on the test set every K epochs (stored per epoch; tables show the "
           "last epoch)", GRID, int, metavar="K"),
    Option("fpr_limit", ("--fpr-limit",),
           "FPR up to which AUPRO integrates (default 0.3; 0.05 is the other common one)",
           GRID, float),
    Option("bootstrap", ("--bootstrap",),
           "resamples of each metric's 95%% confidence interval over test images (default "
           "1000; 0: none)", GRID, int),
    Option("device", ("--device",), "auto (default), cpu, cuda or cuda:N", GRID | {SPEED}),
    Option("workers", ("--workers",), "image-loading worker processes", GRID, int),
    Option("threads", ("--threads",), "torch CPU threads", GRID | {SPEED}, int),
    Option("executor", ("--executor",),
           "local (default), or ray: one Ray task per cell (docs/ray.md)", GRID),
    Option("ray_address", ("--ray-address",),
           "Ray cluster to join, e.g. HEAD:6379 (default: start a local one)", CONFIG),
    Option("gpus_per_cell", ("--gpus-per-cell",),
           "GPUs per Ray task (default: 1 if the cluster has any)", CONFIG, float),
    Option("cpus_per_cell", ("--cpus-per-cell",), "CPUs per Ray task (default: 1)", CONFIG, float),
    Option("retries", ("--retries",), "Ray: reruns of a cell whose worker died (default: 1)",
           CONFIG, int),
    Option("preset", ("--preset",),
           "a built-in preset name or a YAML file; the synthetic dataset defaults to 'quick'",
           CONFIG),
    Option("out", ("--out",), "run folder (default: results/<preset or dataset>)",
           CONFIG | {PAPER, SPEED},
           help_for={
               PAPER: "run folder (default: results/paper-<table>)",
               SPEED: "also write the table: a .csv (every column) or .md file",
           }),
    Option("force", ("--force",), "recompute cells already in the run folder", {RUN, PAPER},
           action="store_true"),
    Option("profile_repeats", ("--profile-repeats",),
           "timed calls per latency figure (default 20)", PROFILED, int, deprecated=("--repeats",)),
    Option("profile_warmup", ("--profile-warmup",),
           "untimed calls before each latency series (default 2)", PROFILED, int,
           deprecated=("--warmup",)),
    Option("throughput_batch", ("--throughput-batch",), "images per call for throughput (default 32)",
           PROFILED, int),
    Option("table_metrics", ("--metrics",),
           "the result tables to show, e.g. image_auroc,image_ap,pixel_f1max (default: "
           "image_auroc,pixel_auroc,aupro; every metric is in results.csv either way)",
           {RUN, REPORT}, csv_list),
    Option("ci", ("--ci",), "show each single-seed cell's 95%% interval: 98.1 [97.4, 98.7]",
           {RUN, REPORT}, action="store_true"),
    Option("profile", ("--no-profile",),
           "skip FLOPs, latency and throughput (parameters, memory and times stay)", CONFIG,
           action="store_false"),
)  # fmt: skip

_BY_DEST = {option.dest: option for option in OPTIONS}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Every option ``command`` takes, as one flag each."""
    for option in OPTIONS:
        if command in option.commands:
            option.add_to(parser, command)


def options_for(command: str) -> list[Option]:
    return [option for option in OPTIONS if command in option.commands]


def _is_given(option: Option, value: Any) -> bool:
    if option.action == "store_true":
        return bool(value)
    return value is not None and value != []


def given(values: dict[str, Any], command: str) -> list[Option]:
    """The options of ``command`` that ``values`` (dest -> value) actually sets."""
    return [o for o in options_for(command) if _is_given(o, values.get(o.dest))]


def coerce(values: dict[str, Any]) -> dict[str, Any]:
    """API values as the parser would give them: ``"a,b"`` for a list option is split."""
    out = dict(values)
    for name, value in values.items():
        option = _BY_DEST.get(name)
        if option is not None and isinstance(value, str) and option.type in (csv_list, int_list):
            out[name] = option.type(value)
        elif option is not None and option.type in (csv_list, int_list) and isinstance(value, int):
            out[name] = [value]
    return out


def check_keywords(keywords: Iterable[str], command: str = RUN) -> None:
    """Unknown API keywords fail with the list of known ones, as an unknown flag would."""
    known = {o.dest for o in options_for(command)} | {"set"}
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise BenchError(f"unknown option {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def build_config(values: dict[str, Any]) -> RunConfig:
    """Preset values first, then every option given (``values`` maps dest -> value).

    A preset's per-method settings are defaults: they apply only to methods in the run,
    and a shared option given here (``epochs``...) wins over them.
    """
    preset = values.get("preset")
    if preset is None and values.get("dataset") in (None, "synthetic"):
        preset = QUICK_PRESET
    config = RunConfig()
    if preset:
        config = dataclasses.replace(config, **load_preset(preset), preset=preset)
    for name in CONFIG_FIELDS - {"set", "preset"}:
        value = values.get(name)
        if value is not None:
            setattr(config, name, value)
    if not config.methods:  # every method that has the run's reference
        config.methods = [
            m for m in METHODS.names() if config.reference in METHODS.get(m).references
        ]
    shared_given = {name for name in SHARED_SETTINGS if values.get(name) is not None}
    in_run = {"*", *config.methods, *(METHODS.entry(m).meta["base"] for m in config.methods)}
    kept = {
        scope: {key: value for key, value in settings.items() if key not in shared_given}
        for scope, settings in config.set.items()
        if scope in in_run
    }
    config.set = {scope: settings for scope, settings in kept.items() if settings}
    for overrides in (values.get("set") or {}, parse_set(values.get("set_items") or [])):
        for scope, settings in overrides.items():
            config.set.setdefault(scope, {}).update(settings)
    if config.out is None:
        config.out = str(Path("results") / (config.preset or config.dataset))
    return config
