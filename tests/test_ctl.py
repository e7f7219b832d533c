"""meteoritctl's command line, without a master: options before or after the command, `--`
ending the options, and the request each form sends (tests/test_control.py drives the
same forms against a real master)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from meteorit import ctl


def request(*argv: str) -> dict[str, Any]:
    return ctl.build_request(ctl.grammar().parse(list(argv)))


def parsed(*argv: str) -> dict[str, Any]:
    return vars(ctl.grammar().parse(list(argv)))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        ctl.grammar().parse(list(argv))
    assert exited.value.code == ctl.EXIT_USAGE
    return capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--json", "status"], ["status", "--json"],
    ["-s", "/tmp/m.sock", "--json", "status"], ["status", "-s", "/tmp/m.sock", "--json"],
    ["-s", "/tmp/m.sock", "status", "--json"], ["--json", "status", "--socket=/tmp/m.sock"],
    ["status", "-s/tmp/m.sock", "--js"],  # argparse's own forms: joined value, abbreviation
])
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = parsed(*argv)
    assert args["command"] == "status" and args["json"] is True
    assert args["socket"] in (None, "/tmp/m.sock")
    assert ("/tmp/m.sock" in " ".join(argv)) == (args["socket"] == "/tmp/m.sock")


def test_every_global_option_after_the_command() -> None:
    args = parsed("scale", "3", "-c", "m.toml", "--timeout", "7", "--json", "-s", "x.sock")
    assert (args["config"], args["timeout"], args["json"], args["socket"], args["workers"]) == \
        ("m.toml", 7.0, True, "x.sock", 3)


def test_an_option_left_out_after_the_command_keeps_the_one_before() -> None:
    args = parsed("-c", "m.toml", "--timeout", "3", "--json", "stop", "--graceful")
    assert (args["config"], args["timeout"], args["json"], args["graceful"]) == ("m.toml", 3.0, True, True)


def test_the_last_of_a_repeated_option_wins() -> None:
    assert parsed("-s", "a.sock", "status", "-s", "b.sock")["socket"] == "b.sock"


def test_config_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METEORIT_CONFIG", "/etc/meteorit/meteorit.toml")
    assert parsed("status", "--json")["config"] == "/etc/meteorit/meteorit.toml"
    assert parsed("status", "-c", "mine.toml")["config"] == "mine.toml"


@pytest.mark.parametrize(("argv", "wanted"), [
    (["broadcast", "a", "hello", "--wait", "2"], {"name": "a", "data": b"hello", "wait": 2.0}),
    (["broadcast", "a", "--wait", "2", "hello"], {"name": "a", "data": b"hello", "wait": 2.0}),
    (["broadcast", "--wait=2", "a", "hello", "--json"], {"name": "a", "data": b"hello", "wait": 2.0}),
    (["broadcast", "a"], {"name": "a", "data": b"", "wait": 0.0}),
    (["send", "42", "a", "x", "--wait", "1"], {"pid": 42, "name": "a", "data": b"x", "wait": 1.0}),
    (["send", "--wait", "1", "42", "a", "x"], {"pid": 42, "name": "a", "data": b"x", "wait": 1.0}),
    (["send", "42", "--json", "a", "--wait", "1", "x"], {"pid": 42, "name": "a", "data": b"x", "wait": 1.0}),
])
def test_alert_options_and_arguments_in_any_order(argv: list[str], wanted: dict[str, Any]) -> None:
    assert request(*argv) == {"cmd": argv[0], **wanted}


@pytest.mark.parametrize(("argv", "data"), [
    (["broadcast", "a", "--", "--json"], b"--json"),
    (["broadcast", "a", "--wait", "1", "--", "-s"], b"-s"),
    (["broadcast", "--", "a", "--wait"], b"--wait"),
    (["broadcast", "a", "--", "--"], b"--"),  # Python 3.11's argparse alone would drop it
    (["broadcast", "a", "--", "-x=1 -y"], b"-x=1 -y"),
    (["broadcast", "a", "-5"], b"-5"),  # a negative number is an argument, as in argparse
    (["send", "42", "a", "--json", "--", "--graceful"], b"--graceful"),
])
def test_double_dash_ends_the_options_so_data_may_start_with_a_dash(argv: list[str], data: bytes) -> None:
    assert request(*argv)["data"] == data


def test_a_lone_dash_is_standard_input_wherever_it_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    for argv in (["broadcast", "a", "-"], ["broadcast", "a", "--", "-"], ["send", "7", "a", "-", "--wait", "1"]):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
        assert request(*argv)["data"] == b"from stdin"


def test_options_after_double_dash_are_arguments_not_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = parsed("broadcast", "a", "--", "--json")
    assert args["json"] is False  # the word went to the alert, not to the output format
    err = usage_error(capsys, "status", "--", "--json")  # status takes no argument
    assert "unrecognized arguments: --json" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["status", "extra"], "unrecognized arguments: extra"),
    (["status", "--frob"], "unrecognized arguments: --frob"),
    (["scale", "many"], "invalid int value: 'many'"),
    (["send", "x", "a"], "invalid int value: 'x'"),
    (["broadcast"], "required: name"),
    (["broadcast", "a", "b", "c"], "unrecognized arguments: c"),
    (["status", "-s"], "expected one argument"),
    (["--json"], "required: COMMAND"),
    ([], "required: COMMAND"),
])
def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    err = usage_error(capsys, *argv)
    assert message in err and " -- " not in err  # the `--` the scanner adds never shows


def test_main_exits_2_on_bad_arguments_and_3_when_not_running(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        ctl.main(["status", "--frob"])
    assert exited.value.code == ctl.EXIT_USAGE
    nowhere = str(tmp_path / "nobody.sock")
    assert ctl.main(["status", "-s", nowhere, "--json"]) == ctl.EXIT_NOT_RUNNING
    assert ctl.main(["-s", nowhere, "status"]) == ctl.EXIT_NOT_RUNNING
    assert "not running" in capsys.readouterr().err
