"""The layout rules: one-way imports between the layers, a small top level, one definition
of every option."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from bench.cli import make_parser
from bench.runner.options import OPTIONS

PACKAGE = Path(__file__).resolve().parents[1] / "bench"

# Floor of each part: a module may import its own floor or lower ones, never higher.
CORE = 0
FLOORS = {"runner": 1, "paper": 2, "check": 2, "report": 3, "cli": 4, "bench": 4}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int:
    parts = module.split(".")
    if parts == ["bench"]:
        return FLOORS["bench"]
    return FLOORS.get(parts[1], CORE)


def _imports(path: Path, module: str) -> set[str]:
    """Every bench module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bench"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] == "bench":
                # `from bench import metrics` imports the module bench.metrics, not the
                # package's own code
                submodules = {f"{target}.{a.name}" for a in node.names}
                found |= {s for s in submodules if _is_module(s)} or {target}
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {t for t in _imports(path, name) if t in modules and t != name}
        for name, path in modules.items()
    }


def test_imports_never_go_up_a_floor() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in _graph().items()
        for target in targets
        if _floor(target) > _floor(source) and not source.startswith(target + ".")
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph()
    for start in graph:
        # a package's __init__ and its own submodules are one unit
        seen, stack = set(), [t for t in graph[start] if not t.startswith(start + ".")]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            assert node != start, f"{start} imports itself through {sorted(seen)}"
            stack.extend(t for t in graph[node] if not start.startswith(t + "."))


def test_top_level_is_small_and_every_package_says_what_it_is() -> None:
    modules = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 8, sorted(p.name for p in modules)
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) == 1, f"{init}: one-line docstring expected"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_shared_flag_is_defined_once() -> None:
    """A flag offered by more than one command comes from the one option table, so it has
    one destination everywhere; every flag of `bench run` is in that table."""
    defined = {flag: option for option in OPTIONS for flag in option.flags + option.deprecated}
    assert len(defined) == sum(len(o.flags) + len(o.deprecated) for o in OPTIONS), "a flag twice"
    seen: dict[str, list[str]] = {}
    for command, sub in _subparsers(make_parser()).items():
        for action in sub._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help", "--debug"):
                    continue
                seen.setdefault(flag, []).append(command)
                if flag in defined:
                    assert action.dest == defined[flag].dest, (command, flag)
    run_flags = [flag for flag, commands in seen.items() if "run" in commands]
    assert run_flags and all(flag in defined for flag in run_flags)
    shared = [flag for flag, commands in seen.items() if len(commands) > 1]
    assert all(flag in defined for flag in shared), [f for f in shared if f not in defined]


def test_deprecated_flag_still_works_and_says_so(capsys) -> None:
    args = make_parser().parse_args(["speed", "--repeats", "3"])
    assert args.profile_repeats == 3
    assert "--repeats is deprecated" in capsys.readouterr().err


def test_every_command_prints_its_help() -> None:
    """argparse expands '%' in help texts only when printing, so a stray '%' passes parsing
    and breaks `bench CMD --help` alone; format every command's help here."""
    parser = make_parser()
    assert "run" in parser.format_help()
    for command, sub in _subparsers(parser).items():
        assert command in sub.format_help()
