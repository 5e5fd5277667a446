"""cli: the commands' common arguments and the one-line exit on a user error; each command's --help describes
that command alone."""
import importlib
import subprocess
import sys

import pytest

from hvd_megdet.checkpoint import CheckpointError
from hvd_megdet.cli import USER_ERRORS, command_parser, exit_on_user_error
from hvd_megdet.config import ConfigError
from hvd_megdet.data import DatasetError
from tests.harness import REPO

COMMANDS = ("train", "evaluate", "predict", "export", "data.browse")


def _help(command, capsys):
    module = importlib.import_module(f"hvd_megdet.{command}")
    with pytest.raises(SystemExit) as ended:
        module.main(["--help"])
    assert ended.value.code == 0
    return " ".join(capsys.readouterr().out.split()), " ".join(module.__doc__.splitlines()[0].split())


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_describes_itself_only(command, capsys):
    text, own = _help(command, capsys)
    assert own in text
    others = [_help(other, capsys)[1] for other in COMMANDS if other != command]
    assert not [line for line in others if line in text]
    assert ("--resume" in text and "--elastic" in text) == (command == "train")
    assert "--config CONFIG" in text and "overrides" in text


def test_evaluate_help_through_python_m_is_evaluations():
    shown = subprocess.run([sys.executable, "-m", "hvd_megdet.evaluate", "--help"], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: evaluate.py [-h] --config CONFIG [overrides ...]")
    assert "Evaluate a trained detector" in shown.stdout and "Train" not in shown.stdout


def test_evaluate_refuses_the_trainers_options(capsys):
    from hvd_megdet import evaluate

    with pytest.raises(SystemExit) as ended:
        evaluate.main(["--config", "configs/demo_shapes.yaml", "--resume"])
    assert ended.value.code == 2
    assert "unrecognized arguments: --resume" in capsys.readouterr().err


def test_command_parser_takes_config_and_overrides():
    parser = command_parser("Do a thing.\n\nMore.")
    parser.add_argument("--output")
    args = parser.parse_intermixed_args(["a.x=1", "--config", "c.yaml", "--output", "o", "b.y=2"])
    assert (args.config, args.overrides, args.output) == ("c.yaml", ["a.x=1", "b.y=2"], "o")
    assert parser.description == "Do a thing."


@pytest.mark.parametrize("error", [ConfigError("model.x: bad"), DatasetError("a.json: missing"),
                                   CheckpointError("c.pth: not a checkpoint")])
def test_a_user_error_ends_the_command_with_one_error_line(error):
    with pytest.raises(SystemExit) as ended:
        with exit_on_user_error():
            raise error
    assert ended.value.code == f"error: {error}"  # sys.exit(str): printed on stderr, exit status 1
    assert isinstance(error, USER_ERRORS)


def test_other_errors_pass_through():
    with pytest.raises(FloatingPointError):
        with exit_on_user_error():
            raise FloatingPointError("not the user's")
