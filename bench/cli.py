"""The ``bench`` command line: run | list | report | paper | speed | check.

It parses and calls; the work is done by the Python API (``bench.run``) and the packages
below it. Options shared between commands come from one table (``bench.runner.options``);
nothing heavy (torch, timm, matplotlib) is imported before a command needs it, so
``bench --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from bench.errors import BenchError, one_line
from bench.runner.options import (
    CHECK,
    PAPER,
    REPORT,
    RUN,
    SPEED,
    add_options,
    csv_list,
    given,
)


def _command(argv: list[str]) -> str:
    return " ".join(["bench", *argv])


def _given(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options of ``command`` given on this command line, by destination."""
    return {o.dest: getattr(args, o.dest) for o in given(vars(args), command)}


def _failures(failures: list[tuple[str, str]]) -> None:
    for label, error in failures:
        print(f"failed: {label}: {one_line(error)}", file=sys.stderr)


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    import bench

    result = bench.run(
        **_given(args, RUN),
        command=_command(argv),
        debug=args.debug,
        announce=True,
    )
    if result.tables:
        print(result.tables)
    print(f"run folder: {result.folder}", file=sys.stderr)
    if result.failures:
        print(f"{len(result.failures)} of {result.cells} cells failed:", file=sys.stderr)
        for label, error in result.failures:
            print(f"  {label}: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.runner.catalog import cached_listing

    print(cached_listing())
    return 0


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.report.markdown import REPORT, rebuild_report

    folder = Path(args.run)
    tables, failures = rebuild_report(folder, args.table_metrics, args.ci)
    print(tables)
    _failures(failures)
    print(f"report: {folder / REPORT}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.report.compare import compare_methods

    print(compare_methods(Path(args.run), args.methods, args.metric, args.resamples))
    return 0


def cmd_paper(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.paper.filled import describe_tables, render_markdown, write_filled
    from bench.paper.reproduce import reproduce
    from bench.report.markdown import REPORT, write_report

    if args.list:
        print(describe_tables())
        return 0
    if not args.table:
        raise BenchError("bench paper: name a table (bench paper --list shows them)")
    result = reproduce(
        args.table,
        _given(args, PAPER),
        source=args.source,
        allow_random_weights=args.allow_random_weights,
        command=_command(argv),
        debug=args.debug,
    )
    if not args.source and not result.rows:
        _failures(result.failures)
        print(
            f"no cell finished, so table {args.table} has none of ours to compare; fix the "
            f"failures above and rerun (run folder: {result.folder})",
            file=sys.stderr,
        )
        return 1
    if args.source:
        write_filled(result.filled, result.folder)
    else:
        write_report(result.folder, result.rows, result.failures, [result.filled])
    print(render_markdown(result.filled))
    _failures(result.failures)
    print(f"written: {result.folder / 'paper' / args.table}.md", file=sys.stderr)
    if not args.source:
        print(f"report: {result.folder / REPORT}", file=sys.stderr)
    return 1 if result.failures else 0


def cmd_speed(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.report.speed_table import caption, check_out_path, format_table, write_table
    from bench.runner.speed import profile_grid

    if args.out:
        check_out_path(Path(args.out))
    rows, settings = profile_grid(_given(args, SPEED), on_row=_speed_progress)
    print(format_table(rows))
    print(caption(rows, settings), file=sys.stderr)
    if args.out:
        write_table(rows, settings, Path(args.out))
        print(f"table written to {args.out}", file=sys.stderr)
    return 1 if any("error" in row for row in rows) else 0


def _speed_progress(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"FAILED {row['method']} / {row['backbone']}: {row['error']}", file=sys.stderr)
    else:
        print(f"profiled {row['method']} / {row['backbone']}", file=sys.stderr)


def cmd_check(args: argparse.Namespace, argv: list[str]) -> int:
    from bench.check import gate

    path = Path(args.baseline)
    flags = [o.flags[0] for o in given(vars(args), CHECK) if o.dest != "out"]
    if flags and (args.run or path.exists()):
        where = f"--run {args.run} holds its own cells" if args.run else f"{path} records it"
        raise BenchError(
            f"{flags[0]}: grid flags only describe a new baseline; {where}. To change the grid "
            f"of {path}, edit its 'config' and rerun with --update"
        )
    return gate.execute(
        path,
        run=args.run,
        out=args.out,
        tolerance=args.tolerance,
        update=args.update,
        new_options=_given(args, CHECK),
        command=_command(argv),
        debug=args.debug,
    )


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: a run folder that the same command resumes, for run and paper;
    nothing for the other commands."""
    if args.command == RUN:
        from bench.runner.options import build_config, coerce

        folder = build_config(coerce(_given(args, RUN))).out
    elif args.command == PAPER and args.table and not args.source:
        from bench.paper.reproduce import paper_folder

        folder = str(paper_folder(args.table, args.out))
    else:
        return "interrupted"
    return (
        f"interrupted; the finished cells are kept in {folder}: rerun the same command to "
        f"resume, or `bench report {folder}` for the tables of what finished"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowad-bench")
    except PackageNotFoundError:
        return "unknown (the package is not installed)"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Warnings reach a user as one line, without the source line Python adds under it."""
    return f"warning: {message}\n"


class _SayOnce:
    """Each warning's text once per command: libraries reset Python's own once-per-place
    memory, and a grid that rebuilds its backbone for each cell would repeat the same
    fallback warning before every cell."""

    def __init__(self, show) -> None:  # noqa: ANN001
        self.show, self.said = show, set()

    def __call__(self, message, category, *rest) -> None:  # noqa: ANN001
        if (str(message), category) not in self.said:
            self.said.add((str(message), category))
            self.show(message, category, *rest)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="Benchmark flow-based image anomaly detectors."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser(RUN, parents=[common], help="train and evaluate a grid of cells")
    add_options(run, RUN)
    run.set_defaults(func=cmd_run)

    lister = sub.add_parser("list", parents=[common], help="methods, datasets and backbones")
    lister.set_defaults(func=cmd_list)

    report = sub.add_parser(
        "report", parents=[common], help="rebuild the tables of a run folder from its store"
    )
    report.add_argument("run", help="run folder")
    add_options(report, REPORT)
    report.set_defaults(func=cmd_report)

    comparer = sub.add_parser(
        "compare",
        parents=[common],
        help="which differences between two methods of a run are real (paired tests)",
        description="Paired bootstrap of the difference per category (same test images) and "
        "sign / Wilcoxon tests over categories, from a run folder's stored evidence.",
    )
    comparer.add_argument("run", help="run folder")
    comparer.add_argument("--methods", type=csv_list, required=True, help="two methods: a,b")
    comparer.add_argument("--metric", default="image_auroc", help="default image_auroc")
    comparer.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)"
    )
    comparer.set_defaults(func=cmd_compare)

    paper = sub.add_parser(
        PAPER,
        parents=[common],
        help="print a paper's table with published / ours / delta per cell",
        description="Run the grid a paper table needs (or read --from RUN) and print the "
        "table with three numbers per cell: published, ours, delta.",
    )
    paper.add_argument("table", nargs="?", help="table name (see --list)")
    paper.add_argument("--list", action="store_true", help="name the tables and what each runs")
    paper.add_argument(
        "--from", dest="source", metavar="RUN", help="read this run folder instead of running"
    )
    paper.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="run with weights other than ImageNet (tables then say they are not comparable)",
    )
    add_options(paper, PAPER)
    paper.set_defaults(func=cmd_paper)

    speed = sub.add_parser(
        SPEED,
        parents=[common],
        help="parameters, FLOPs, latency, throughput and memory on random input (no dataset)",
    )
    add_options(speed, SPEED)
    speed.set_defaults(func=cmd_speed)

    checker = sub.add_parser(
        CHECK,
        parents=[common],
        help="regression gate: rerun a baseline's grid and compare every metric",
        description="Run the grid a baseline file records (or read --run) and compare every "
        "metric of every cell with it; exit 1 when one drops by more than its tolerance or a "
        "cell is missing. The `bench run` options apply only when --update creates a new file.",
    )
    checker.add_argument("--baseline", required=True, help="baseline JSON file")
    checker.add_argument("--run", help="compare this run folder instead of running the grid")
    checker.add_argument(
        "--tolerance", type=float, help="one tolerance for every metric (default: the file's)"
    )
    checker.add_argument(
        "--update", action="store_true", help="(re)write the baseline from this run"
    )
    add_options(checker, CHECK)
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
    warnings.formatwarning = _one_line_warning
    shown = warnings.showwarning
    warnings.showwarning = _SayOnce(shown.show if isinstance(shown, _SayOnce) else shown)
    try:
        return args.func(args, argv)
    except BenchError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
