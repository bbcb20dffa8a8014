"""The CLI's foundation: help, version, doctor, error lines and exit codes, --config handling."""

from __future__ import annotations

import click
import pytest
import yaml

import mambascope
from mambascope.cli import main as cli_main
from mambascope.cli.options import config_option, save_run_config
from mambascope.errors import ConfigError, DataError


def run(capsys, args):
    code = cli_main.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_commands(capsys):
    code, out, _ = run(capsys, ["--help"])
    assert code == 0
    assert "doctor" in out
    assert "Usage: mambascope" in out


def test_version(capsys):
    code, out, _ = run(capsys, ["--version"])
    assert code == 0
    assert mambascope.__version__ in out


def test_doctor_reports_environment(capsys):
    code, out, _ = run(capsys, ["doctor"])
    assert code == 0
    for name in ("python", "torch", "cuda", "triton", "openslide", "scan backends", "sample data"):
        assert name in out
    assert "reference: yes" in out
    assert "9/9 files" in out


def test_unknown_option_is_one_line_exit_2(capsys):
    code, _, err = run(capsys, ["doctor", "--no-such-option"])
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "--no-such-option" in err


def _echo_command():
    """A small command using the shared --config option, to test the mechanism in isolation."""

    @click.command("echo-config")
    @config_option
    @click.option("--size", type=int, default=256)
    @click.option("--name", default="x")
    @click.option("--out", type=click.Path(), required=True)
    def echo_config(size: int, name: str, out: str) -> None:
        save_run_config(out, {"size": size, "name": name, "out": out})

    return echo_config


@pytest.fixture()
def echo_cli(monkeypatch):
    command = _echo_command()
    cli_main.cli.add_command(command)
    yield
    cli_main.cli.commands.pop("echo-config")


def test_config_file_sets_defaults_and_cli_overrides(tmp_path, capsys, echo_cli):
    config = tmp_path / "c.yaml"
    config.write_text("size: 512\nname: from-file\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, ["echo-config", "--config", str(config), "--name", "cli", "--out", str(out)])
    assert code == 0, err
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["size"] == 512
    assert resolved["name"] == "cli"
    assert resolved["command"].endswith("echo-config")


def test_missing_config_file_exit_2(tmp_path, capsys, echo_cli):
    code, _, err = run(capsys, ["echo-config", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)])
    assert code == 2
    assert "config file not found" in err and "nope.yaml" in err
    assert err.strip().count("\n") == 0


def test_malformed_yaml_exit_2(tmp_path, capsys, echo_cli):
    config = tmp_path / "bad.yaml"
    config.write_text("size: [1, 2\nname: x\n")
    code, _, err = run(capsys, ["echo-config", "--config", str(config), "--out", str(tmp_path)])
    assert code == 2
    assert "not valid YAML" in err and "bad.yaml" in err
    assert "Traceback" not in err


def test_unknown_key_in_config_exit_2(tmp_path, capsys, echo_cli):
    config = tmp_path / "c.yaml"
    config.write_text("sise: 3\n")
    code, _, err = run(capsys, ["echo-config", "--config", str(config), "--out", str(tmp_path)])
    assert code == 2
    assert "sise" in err


def test_user_error_prints_one_line_and_debug_shows_traceback(capsys, monkeypatch):
    @click.command("fail")
    def fail() -> None:
        raise DataError("features file has no 'features' dataset", path="/x/a.h5", hint="re-run features")

    cli_main.cli.add_command(fail)
    try:
        code, _, err = run(capsys, ["fail"])
        assert code == 1
        assert err.strip() == ("error: features file has no 'features' dataset: /x/a.h5 "
                               "(fix: re-run features)")
        code, _, err = run(capsys, ["--debug", "fail"])
        assert code == 1
        assert "Traceback" in err
    finally:
        cli_main.cli.commands.pop("fail")


def test_config_error_exit_code_is_2():
    assert ConfigError("x").exit_code == 2
    assert DataError("x").exit_code == 1


def test_real_commands_take_config_and_reject_bad_ones(tmp_path, capsys):
    """Every command with many options has --config; a missing or malformed file is one line, exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("patch_size: [256\n")
    for command in (["tile"], ["features"], ["train", "mil"], ["predict"], ["segment", "train"]):
        code, _, err = run(capsys, [*command, "--config", str(tmp_path / "missing.yaml")])
        assert code == 2, command
        assert "config file not found" in err and err.strip().count("\n") == 0
        code, _, err = run(capsys, [*command, "--config", str(bad)])
        assert code == 2, command
        assert "not valid YAML" in err and "Traceback" not in err


def test_help_lists_only_the_working_command_groups(capsys):
    code, out, _ = run(capsys, ["--help"])
    assert code == 0
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == {"demo", "doctor", "evaluate", "features", "predict", "segment", "stats", "tile", "train"}
