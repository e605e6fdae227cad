"""Registry lookups, entry-point plugins, settings overrides and grid expansion."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

from bench import registry
from bench.errors import BenchError
from bench.registry import DATASETS, METHODS, Registry
from bench.runner.config import RunConfig, load_preset, parse_set
from bench.runner.grid import expand_cells


def test_unknown_name_lists_known():
    with pytest.raises(BenchError, match=r"unknown method 'nope'; known: .*padim"):
        METHODS.get("nope")


def test_register_decorator_and_duplicate():
    table: Registry[type] = Registry("thing")

    @table.register("a", colour="red")
    class A:
        pass

    assert table.get("a") is A and table.entry("a").meta == {"colour": "red"}
    with pytest.raises(BenchError, match="registered twice"):
        table.add("a", object())


def test_builtin_plugins_registered():
    assert {"padim", "fastflow", "fastflow-3x3", "cflow"} <= set(METHODS.names())
    assert {"mvtec", "btad", "cifar10", "synthetic"} <= set(DATASETS.names())


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch):
    module = tmp_path / "my_plugin.py"
    module.write_text(
        "from bench.registry import DATASETS\n"
        "@DATASETS.register('my-data')\n"
        "class MyData:\n"
        "    categories = ('x',)\n"
        "    has_masks = False\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = EntryPoint(name="mine", value="my_plugin", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [fake])
    monkeypatch.setattr(registry, "_loaded", set())
    try:
        assert "my-data" in DATASETS.names()
    finally:
        DATASETS._entries.pop("my-data", None)
        sys.modules.pop("my_plugin", None)


def test_broken_plugin_is_named(monkeypatch):
    fake = EntryPoint(name="broken", value="no_such_module_xyz", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [fake])
    monkeypatch.setattr(registry, "_loaded", set())
    with pytest.raises(BenchError, match="plugin 'broken'"):
        registry.load_plugins()


def test_parse_set():
    assert parse_set(["fastflow.conv3x3_only=true", "epochs=3"]) == {
        "fastflow": {"conv3x3_only": "true"},
        "*": {"epochs": "3"},
    }
    with pytest.raises(BenchError, match="method.key=value"):
        parse_set(["oops"])


def test_cells_resolve_defaults_variants_flags_and_set():
    config = RunConfig(
        methods=["padim", "fastflow", "fastflow-3x3"],
        seeds=[0, 1],
        epochs=7,
        set={"fastflow": {"hidden_ratio": "0.5"}, "padim": {"n_features": "50"}},
    )
    cells = expand_cells(config, ["brick"])
    assert len(cells) == 6
    by = {(c.method, c.seed): c for c in cells}
    assert by[("padim", 0)].settings["n_features"] == 50
    assert by[("fastflow", 0)].settings["epochs"] == 7
    assert by[("fastflow", 0)].settings["conv3x3_only"] is True  # original R18 default
    assert by[("fastflow-3x3", 1)].settings["hidden_ratio"] == 0.5  # base scope applies
    assert by[("fastflow-3x3", 1)].base == "fastflow"
    assert len({c.key for c in cells}) == 6


def test_cell_key_changes_with_settings():
    a = expand_cells(RunConfig(methods=["padim"]), ["brick"])[0]
    b = expand_cells(RunConfig(methods=["padim"], set={"padim": {"blur_sigma": "2"}}), ["brick"])[0]
    assert a.key != b.key and a.key == expand_cells(RunConfig(methods=["padim"]), ["brick"])[0].key


def test_bad_set_values_are_explained():
    with pytest.raises(BenchError, match="unknown setting; padim has"):
        expand_cells(RunConfig(methods=["padim"], set={"padim": {"nope": "1"}}), ["x"])
    with pytest.raises(BenchError, match="expected int"):
        expand_cells(RunConfig(methods=["padim"], set={"padim": {"batch_size": "big"}}), ["x"])
    with pytest.raises(BenchError, match="not a method of this run"):
        expand_cells(RunConfig(methods=["padim"], set={"cflow": {"lr": "1"}}), ["x"])


def test_presets(tmp_path):
    assert load_preset("quick")["dataset"] == "synthetic"
    with pytest.raises(BenchError, match="unknown preset"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: red\n")
    with pytest.raises(BenchError, match="unknown keys colour"):
        load_preset(str(bad))


def test_config_validation():
    with pytest.raises(BenchError, match="--reference"):
        RunConfig(methods=["padim"], reference="mine").validate()
    with pytest.raises(BenchError, match="--weights"):
        RunConfig(methods=["padim"], weights="nowhere.pth").validate()
    with pytest.raises(BenchError, match="unknown dataset"):
        RunConfig(methods=["padim"], dataset="imagenet").validate()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("threads", -3, "--threads -3: give 1 or more, or omit the option"),
        ("threads", 0, "--threads 0: give 1 or more"),
        ("workers", -1, "--workers -1: give 0"),
        ("backbones", ["resnet18", "resnet19"], "--backbones resnet19: unknown backbone"),
        ("input_size", 7, "--input-size 7: give 32 .the backbones' coarsest stride. to 4096"),
        ("input_size", 100_000, "--input-size 100000: give 32"),
    ],
)
def test_resource_options_are_checked_before_anything_runs(option, value, message) -> None:
    with pytest.raises(BenchError, match=message):
        RunConfig(methods=["padim"], **{option: value}).validate()


def test_accepted_resource_options_pass() -> None:
    RunConfig(methods=["padim"], threads=1, workers=0, input_size=32).validate()
    RunConfig(methods=["padim"], input_size=4096).validate()


def test_bad_options_leave_no_run_folder_in_run_and_speed(tmp_path, capsys) -> None:
    from bench.cli import main

    out = tmp_path / "run"
    assert main(["run", "--methods", "padim", "--workers", "-1", "--out", str(out)]) == 2
    assert "error: --workers -1" in capsys.readouterr().err and not out.exists()
    assert main(["speed", "--methods", "padim", "--input-size", "7"]) == 2
    assert "error: --input-size 7" in capsys.readouterr().err
    assert main(["speed", "--methods", "padim", "--threads", "0"]) == 2
    assert "error: --threads 0" in capsys.readouterr().err


def test_preset_method_settings_are_defaults_for_methods_in_the_run():
    from bench.cli import make_parser
    from bench.runner.options import RUN, build_config, given

    def config(*argv: str) -> RunConfig:
        args = vars(make_parser().parse_args(["run", *argv]))
        return build_config({o.dest: args[o.dest] for o in given(args, RUN)})

    quick = {
        "cflow": {"epochs": 1, "sub_epochs": 2, "zero_grad_to_none": True},
        "csflow": {"epochs": 3, "hidden_channels": 128},
        "msflow": {"epochs": 1},
    }
    assert config().set == {**quick, "uflow": {"epochs": 3}}  # the quick preset
    assert config("--methods", "padim").set == {}  # no error about cflow not being in the run
    # the flag wins over the preset's epochs; the other settings stay
    assert config("--epochs", "3").set == {
        "cflow": {"sub_epochs": 2, "zero_grad_to_none": True},
        "csflow": {"hidden_channels": 128},
    }
    assert config("--set", "cflow.epochs=2").set == {
        **quick,
        "cflow": {**quick["cflow"], "epochs": "2"},
        "uflow": {"epochs": 3},
    }
    cells = expand_cells(config("--methods", "cflow,fastflow"), ["brick"])
    assert {c.method: c.settings["epochs"] for c in cells} == {"cflow": 1, "fastflow": 5}


def test_interrupted_plugin_import_is_retried(monkeypatch):
    import bench.registry as registry

    calls = []
    real = registry._import_plugins

    def interrupted_once(package):
        calls.append(package)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(package)

    monkeypatch.setattr(registry, "_loaded", set())
    monkeypatch.setattr(registry, "_import_plugins", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        registry.load_plugins()
    assert "padim" in registry.METHODS.names() and calls[:2] == ["bench.methods"] * 2


def test_reading_datasets_imports_no_method_and_no_torch() -> None:
    """`bench report` and the paper tables look datasets up; that must stay torch-free."""
    code = (
        "import sys; from bench.registry import DATASETS; "
        "assert 'mvtec' in DATASETS.names() and DATASETS.get('mvtec').categories; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('bench.methods')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_per_category_settings_override_everything_for_their_category() -> None:
    config = RunConfig(
        methods=["cflow", "padim"],
        input_size=200,
        set={"cflow": {"epochs": 2}},
        per_category={"brick": {"cflow.input_size": 96, "epochs": 3}},
    )
    cells = {(c.method, c.category): c.settings for c in expand_cells(config, ["brick", "wall"])}
    assert cells[("cflow", "brick")]["input_size"] == 96
    assert cells[("cflow", "brick")]["epochs"] == 3  # a bare key reaches every method having it
    assert cells[("cflow", "wall")]["input_size"] == 200 and cells[("cflow", "wall")]["epochs"] == 2
    assert cells[("padim", "brick")]["input_size"] == 200  # cflow.… leaves padim alone
    with pytest.raises(BenchError, match="unknown setting"):
        expand_cells(
            RunConfig(methods=["padim"], per_category={"brick": {"padim.nope": 1}}), ["brick"]
        )
    with pytest.raises(BenchError, match="per_category.brick"):
        RunConfig(methods=["padim"], per_category={"brick": 5}).validate()


def test_all_methods_means_those_with_the_runs_reference() -> None:
    from bench.runner.options import build_config

    assert "msflow" in build_config({}).methods
    anomalib = build_config({"reference": "anomalib"}).methods
    assert "msflow" not in anomalib and {"fastflow", "cflow", "padim"} <= set(anomalib)


def test_bench_list_is_kept_until_a_plugin_changes(tmp_path, monkeypatch):
    from bench.datasets.base import CACHE_ENV
    from bench.runner import catalog

    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    listing = catalog.cached_listing()
    assert listing == catalog.describe_plugins() and "fastflow" in listing
    assert len(list(cache.glob("list-*.txt"))) == 1
    code = (
        "import sys; from bench.runner.catalog import cached_listing; text = cached_listing(); "
        "print('torch' in sys.modules, text.startswith('methods:'))"
    )
    env = {**os.environ, CACHE_ENV: str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "True"], out.stderr  # read back without torch

    before = catalog.listing_key()
    module = tmp_path / "my_list_plugin.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = EntryPoint(name="mine", value="my_list_plugin", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(catalog, "entry_points", lambda group: [fake])
    with_plugin = catalog.listing_key()
    assert with_plugin not in (None, before)  # a new plugin: a new listing
    module.write_text("VALUE = 22\n")
    assert catalog.listing_key() not in (with_plugin, before)  # its code changed
    missing = EntryPoint(
        name="gone", value="no_such_module_for_list", group=registry.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(catalog, "entry_points", lambda group: [missing])
    assert catalog.listing_key() is None  # unlocatable: no cache, the import reports it
