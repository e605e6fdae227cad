"""The ``bench`` command line: run | list | report | check."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from bench.config import RunConfig, load_preset, parse_set
from bench.errors import BenchError
from bench.registry import BACKBONES, DATASETS, METHODS

QUICK_PRESET = "quick"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got '{text}'"
        ) from exc


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--methods", type=_csv, help="comma-separated method names (default: every registered one)")
    add("--dataset", help="dataset name (default: synthetic, the embedded one)")
    add("--data-root", help="the dataset's folder in its original layout")
    add("--categories", type=_csv, help="comma-separated categories, or 'all' (default)")
    add("--backbone", "--backbones", dest="backbones", type=_csv, help="timm backbone names")
    add("--seeds", type=_seeds, help="comma-separated seeds (default: 0)")
    add("--reference", help="original (default) or anomalib: whose defaults a method follows")
    add("--weights", help="auto (default) | imagenet | random | PATH to a checkpoint")
    add("--input-size", type=int, help="input side in pixels (default: each method's reference)")
    add("--epochs", type=int, help="training epochs for every method that trains")
    add("--batch-size", type=int, help="training batch size for every method")
    add("--lr", type=float, help="learning rate for every method that trains")
    add(
        "--set",
        dest="set_items",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override one method setting, e.g. fastflow.conv3x3_only=true (repeatable)",
    )
    add("--out", help="run folder (default: results/<preset or dataset>)")
    add("--device", help="auto (default), cpu, cuda or cuda:N")
    add("--workers", type=int, help="image-loading worker processes")
    add("--threads", type=int, help="torch CPU threads")
    add("--executor", help="local (default)")
    add(
        "--preset",
        help="a built-in preset name or a YAML file; the synthetic dataset defaults to 'quick'",
    )
    add("--force", action="store_true", help="recompute cells already in the run folder")


def build_config(args: argparse.Namespace) -> RunConfig:
    """Preset values first, then every flag given on the command line."""
    preset = args.preset
    if preset is None and args.dataset in (None, "synthetic"):
        preset = QUICK_PRESET
    config = RunConfig()
    if preset:
        config = dataclasses.replace(config, **load_preset(preset), preset=preset)
    direct = [
        "methods",
        "dataset",
        "data_root",
        "categories",
        "backbones",
        "seeds",
        "reference",
        "weights",
        "input_size",
        "epochs",
        "batch_size",
        "lr",
        "out",
        "device",
        "workers",
        "threads",
        "executor",
    ]
    for name in direct:
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    for scope, values in parse_set(args.set_items).items():
        config.set.setdefault(scope, {}).update(values)
    if not config.methods:
        config.methods = METHODS.names()
    if config.out is None:
        config.out = str(Path("results") / (config.preset or config.dataset))
    return config


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.runner import run_grid

    config = build_config(args)
    print(
        f"run: methods {','.join(config.methods)} | dataset {config.dataset} | "
        f"backbones {','.join(config.backbones)} | seeds {','.join(map(str, config.seeds))} | "
        f"reference {config.reference} | weights {config.weights}"
        + (f" | preset {config.preset}" if config.preset else ""),
        file=sys.stderr,
    )
    summary = run_grid(config, argv, force=args.force, debug=args.debug)
    if summary.tables:
        print(summary.tables)
    print(f"run folder: {summary.folder}", file=sys.stderr)
    if summary.failures:
        print(f"{len(summary.failures)} of {summary.cells} cells failed:", file=sys.stderr)
        for label, error in summary.failures:
            print(f"  {label}: {error.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace, argv: list[str]) -> int:
    print("methods:")
    bases: dict[str, list[str]] = {}
    for name in METHODS.names():
        bases.setdefault(METHODS.entry(name).meta["base"], []).append(name)
    for base, names in sorted(bases.items()):
        variants = []
        for name in names:
            if name != base:
                preset = METHODS.entry(name).meta["settings"]
                variants.append(f"{name} ({', '.join(f'{k}={v}' for k, v in preset.items())})")
        suffix = f"; variants: {'; '.join(variants)}" if variants else ""
        print(f"  {base}{suffix}")
    print("datasets:")
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        masks = "" if cls.has_masks else " (no masks: pixel metrics absent)"
        print(f"  {name}{masks}: {', '.join(cls.categories)}")
    print("backbones:")
    for name in BACKBONES.names():
        spec = BACKBONES.get(name)
        tags = ", ".join(f"{k}: {v}" for k, v in spec.imagenet_tags.items())
        print(f"  {name} [{spec.kind}] ImageNet tags by provenance: {tags}")
    print("  (any other timm CNN name works too, with timm's default weights)")
    return 0


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.report import results_frame, write_tables
    from bench.store import ResultStore

    folder = Path(args.run)
    store = ResultStore.open_existing(folder)
    rows = store.rows()
    failures = store.failures()
    store.close()
    if not rows:
        raise BenchError(f"{folder}: the store holds no finished cells yet")
    print(write_tables(results_frame(rows), folder))
    for label, error in failures:
        print(f"failed: {label}: {error.splitlines()[0]}", file=sys.stderr)
    return 0


def _grid_flags_given(args: argparse.Namespace) -> list[str]:
    """The `bench run` flags on this command line, except --out (which says where, not what)."""
    probe = argparse.ArgumentParser(add_help=False)
    _add_run_arguments(probe)
    return [
        action.option_strings[0]
        for action in probe._actions
        if action.dest != "out" and getattr(args, action.dest) != action.default
    ]


def cmd_check(args: argparse.Namespace, argv: list[str]) -> int:
    from bench import check

    path = Path(args.baseline)
    flags = _grid_flags_given(args)
    if "--force" in flags:
        raise BenchError("--force: bench check always recomputes its grid (--run reads a folder)")
    if flags and (args.run or path.exists()):
        where = f"--run {args.run} holds its own cells" if args.run else f"{path} records it"
        raise BenchError(
            f"{flags[0]}: grid flags only describe a new baseline; {where}. To change the grid "
            f"of {path}, edit its 'config' and rerun with --update"
        )
    return check.execute(
        path,
        run=args.run,
        out=args.out,
        tolerance=args.tolerance,
        update=args.update,
        new_config=lambda: build_config(args),
        argv=argv,
        debug=args.debug,
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="Benchmark flow-based image anomaly detectors."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", parents=[common], help="train and evaluate a grid of cells")
    _add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    lister = sub.add_parser("list", parents=[common], help="methods, datasets and backbones")
    lister.set_defaults(func=cmd_list)
    report = sub.add_parser(
        "report", parents=[common], help="rebuild the tables of a run folder from its store"
    )
    report.add_argument("run", help="run folder")
    report.set_defaults(func=cmd_report)
    checker = sub.add_parser(
        "check",
        parents=[common],
        help="regression gate: rerun a baseline's grid and compare every metric",
        description="Run the grid a baseline file records (or read --run) and compare every "
        "metric of every cell with it; exit 1 when one drops by more than its tolerance or a "
        "cell is missing. The `bench run` flags apply only when --update creates a new file.",
    )
    checker.add_argument("--baseline", required=True, help="baseline JSON file")
    checker.add_argument("--run", help="compare this run folder instead of running the grid")
    checker.add_argument(
        "--tolerance", type=float, help="one tolerance for every metric (default: the file's)"
    )
    checker.add_argument(
        "--update", action="store_true", help="(re)write the baseline from this run"
    )
    _add_run_arguments(checker)
    checker.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warnings.simplefilter("default")
    try:
        return args.func(args, argv)
    except BenchError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished cells are kept in the run folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
