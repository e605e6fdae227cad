"""The ``bench`` command line: run | list | report | paper | speed | check."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.config import SHARED_SETTINGS, RunConfig, load_preset, parse_set
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


def _add_set_argument(add: Callable[..., Any]) -> None:
    add(
        "--set",
        dest="set_items",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override one method setting, e.g. fastflow.conv3x3_only=true (repeatable)",
    )


def _add_grid_arguments(add: Callable[..., Any]) -> None:
    """Options `bench run` and `bench paper` share: what data, how long, where it runs."""
    add("--data-root", help="the dataset's folder in its original layout")
    add("--categories", type=_csv, help="comma-separated categories, or 'all' (default)")
    add("--seeds", type=_seeds, help="comma-separated seeds (default: 0)")
    add("--input-size", type=int, help="input side in pixels (default: each method's reference)")
    add("--epochs", type=int, help="training epochs for every method that trains")
    add("--batch-size", type=int, help="training batch size for every method")
    add("--lr", type=float, help="learning rate for every method that trains")
    _add_set_argument(add)
    add("--device", help="auto (default), cpu, cuda or cuda:N")
    add("--workers", type=int, help="image-loading worker processes")
    add("--threads", type=int, help="torch CPU threads")
    add("--executor", help="local (default), or ray: one Ray task per cell (docs/ray.md)")
    add("--force", action="store_true", help="recompute cells already in the run folder")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    _add_grid_arguments(add)
    add("--methods", type=_csv, help="comma-separated method names (default: every registered one)")
    add("--dataset", help="dataset name (default: synthetic, the embedded one)")
    add("--backbone", "--backbones", dest="backbones", type=_csv, help="timm backbone names")
    add("--reference", help="original (default) or anomalib: whose defaults a method follows")
    add("--weights", help="auto (default) | imagenet | random | PATH to a checkpoint")
    add("--out", help="run folder (default: results/<preset or dataset>)")
    add("--ray-address", help="Ray cluster to join, e.g. HEAD:6379 (default: start a local one)")
    add("--gpus-per-cell", type=float, help="GPUs per Ray task (default: 1 if the cluster has any)")
    add("--cpus-per-cell", type=float, help="CPUs per Ray task (default: 1)")
    add("--retries", type=int, help="Ray: reruns of a cell whose worker died (default: 1)")
    add(
        "--preset",
        help="a built-in preset name or a YAML file; the synthetic dataset defaults to 'quick'",
    )
    add("--profile-repeats", type=int, help="timed calls per latency figure (default 20)")
    add("--profile-warmup", type=int, help="untimed calls before each latency series (default 2)")
    add("--throughput-batch", type=int, help="images per call for throughput (default 32)")
    add(
        "--no-profile",
        dest="profile",
        action="store_const",
        const=False,
        help="skip FLOPs, latency and throughput (parameters, memory and times stay)",
    )


def _preset_settings_in_play(config: RunConfig, args: argparse.Namespace) -> dict:
    """A preset's per-method settings are defaults: they apply only to methods in the run,
    and a shared flag given on the command line (``--epochs``...) wins over them."""
    given = {name for name in SHARED_SETTINGS if getattr(args, name) is not None}
    in_run = {"*", *config.methods, *(METHODS.entry(m).meta["base"] for m in config.methods)}
    kept = {
        scope: {key: value for key, value in values.items() if key not in given}
        for scope, values in config.set.items()
        if scope in in_run
    }
    return {scope: values for scope, values in kept.items() if values}


def _add_paper_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("table", nargs="?", help="table name (see --list)")
    add("--list", action="store_true", help="name the tables and what each runs")
    add("--from", dest="source", metavar="RUN", help="read this run folder instead of running")
    add("--reference", help="original or anomalib (default: the table's; with --from, the run's)")
    add(
        "--backbone",
        "--backbones",
        dest="backbones",
        type=_csv,
        help="a subset of the table's backbones; for a one-backbone table, a replacement",
    )
    add(
        "--allow-random-weights",
        action="store_true",
        help="run with weights other than ImageNet (tables then say they are not comparable)",
    )
    add("--weights", help="imagenet (default) | PATH | random or auto with --allow-random-weights")
    add("--out", help="run folder (default: results/paper-<table>)")
    _add_grid_arguments(add)


def build_config(args: argparse.Namespace) -> RunConfig:
    """Preset values first, then every flag given on the command line."""
    preset = args.preset
    if preset is None and args.dataset in (None, "synthetic"):
        preset = QUICK_PRESET
    config = RunConfig()
    if preset:
        config = dataclasses.replace(config, **load_preset(preset), preset=preset)
    direct = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("set", "preset")]
    for name in direct:
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    if not config.methods:
        config.methods = METHODS.names()
    config.set = _preset_settings_in_play(config, args)
    for scope, values in parse_set(args.set_items).items():
        config.set.setdefault(scope, {}).update(values)
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


def _stored(folder: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    from bench.store import ResultStore

    store = ResultStore.open_existing(folder)
    rows, failures = store.rows(), store.failures()
    store.close()
    if not rows:
        raise BenchError(f"{folder}: the store holds no finished cells yet")
    return rows, failures


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.run_report import REPORT, write_report

    folder = Path(args.run)
    rows, failures = _stored(folder)
    print(write_report(folder, rows, failures))
    for label, error in failures:
        print(f"failed: {label}: {error.splitlines()[0]}", file=sys.stderr)
    print(f"report: {folder / REPORT}", file=sys.stderr)
    return 0


PAPER_RUN_FLAGS = (
    "data_root",
    "categories",
    "seeds",
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
)


def _paper_rows(
    args: argparse.Namespace, argv: list[str], table
) -> tuple[Path, list[dict], list[tuple[str, str]]]:
    """Run the table's grids (or read --from): the folder, its rows, this run's failures."""
    from bench.config import expand_cells
    from bench.published import check_weights, grid_configs
    from bench.runner import resolve_categories, run_grid

    given = [f for f in PAPER_RUN_FLAGS if getattr(args, f) is not None]
    if args.source:
        if given or args.set_items or args.force:
            flags = [f"--{f.replace('_', '-')}" for f in given] or ["--set/--force"]
            raise BenchError(
                f"{', '.join(flags)}: --from reads a finished run; run flags do not apply"
            )
        folder = Path(args.source)
        return folder, _stored(folder)[0], []
    overrides = {f: getattr(args, f) for f in given if f != "out"}
    overrides["backbones"] = args.backbones
    if args.reference:
        overrides["reference"] = args.reference
    if args.set_items:
        overrides["set"] = parse_set(args.set_items)
    folder = Path(args.out or Path("results") / f"paper-{table.name}")
    configs = grid_configs(table, overrides, folder)
    for config in configs:
        check_weights(config.weights, args.allow_random_weights)
    keys, failures = set(), []
    for config in configs:
        summary = run_grid(config, argv, force=args.force, debug=args.debug)
        keys |= {c.key for c in expand_cells(config, resolve_categories(config))}
        failures += summary.failures
    return folder, [r for r in _stored(folder)[0] if r["cell_key"] in keys], failures


def cmd_paper(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.comparison import compare, describe_tables, render_markdown, write_comparison
    from bench.published import check_backbones, load_table
    from bench.run_report import REPORT, write_report

    if args.list:
        print(describe_tables())
        return 0
    if not args.table:
        raise BenchError("bench paper: name a table (bench paper --list shows them)")
    table = load_table(args.table)
    substitute = check_backbones(table, args.backbones)
    folder, rows, failures = _paper_rows(args, argv, table)
    comparison = compare(table, rows, args.reference, substitute)
    if args.source:
        write_comparison(comparison, folder)
    else:
        write_report(folder, rows, failures, [comparison])
    print(render_markdown(comparison))
    for label, error in failures:
        print(f"failed: {label}: {error.splitlines()[0]}", file=sys.stderr)
    print(f"written: {folder / 'paper' / table.name}.md", file=sys.stderr)
    if not args.source:
        print(f"report: {folder / REPORT}", file=sys.stderr)
    return 1 if failures else 0


def _add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--methods", type=_csv, help="comma-separated method names (default: every registered one)")
    add("--backbone", "--backbones", dest="backbones", type=_csv, help="timm backbone names")
    add("--input-size", type=int, help="input side in pixels (default: each method's reference)")
    add("--reference", default="original", help="original (default) or anomalib")
    add("--weights", default="random", help="random (default) | auto | imagenet | PATH")
    add("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    add("--threads", type=int, help="torch CPU threads")
    add("--repeats", type=int, default=20, help="timed calls per latency figure (default 20)")
    add("--warmup", type=int, default=2, help="untimed calls before each series (default 2)")
    add("--throughput-batch", type=int, default=32, help="images per throughput call (default 32)")
    _add_set_argument(add)
    add("--out", help="also write the table: a .csv (every column) or .md file")


def cmd_speed(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from bench.cell import resolve_device
    from bench.speed import caption, check_out_path, format_table, speed_rows, write_table

    config = RunConfig(
        methods=args.methods or METHODS.names(),
        backbones=args.backbones or ["resnet18"],
        reference=args.reference,
        weights=args.weights,
        input_size=args.input_size,
        set=parse_set(args.set_items),
        device=args.device,
        threads=args.threads,
        profile_repeats=args.repeats,
        profile_warmup=args.warmup,
        throughput_batch=args.throughput_batch,
    )
    config.validate()
    settings = config.profile_settings()
    if args.out:
        check_out_path(Path(args.out))
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    rows = []
    for row in speed_rows(config, settings, device):
        if "error" in row:
            print(f"FAILED {row['method']} / {row['backbone']}: {row['error']}", file=sys.stderr)
        else:
            print(f"profiled {row['method']} / {row['backbone']}", file=sys.stderr)
        rows.append(row)
    print(format_table(rows))
    print(caption(rows, settings), file=sys.stderr)
    if args.out:
        write_table(rows, settings, Path(args.out))
        print(f"table written to {args.out}", file=sys.stderr)
    return 1 if any("error" in row for row in rows) else 0


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
    paper = sub.add_parser(
        "paper",
        parents=[common],
        help="print a paper's table with published / ours / delta per cell",
        description="Run the grid a paper table needs (or read --from RUN) and print the "
        "table with three numbers per cell: published, ours, delta.",
    )
    _add_paper_arguments(paper)
    paper.set_defaults(func=cmd_paper)
    speed = sub.add_parser(
        "speed",
        parents=[common],
        help="parameters, FLOPs, latency, throughput and memory on random input (no dataset)",
    )
    _add_speed_arguments(speed)
    speed.set_defaults(func=cmd_speed)
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
