"""What the commands (train, evaluate, predict, export, data.browse) share at their boundary: `--config FILE`
with dotted overrides, and the errors in what the user gave, which end the command with one line
`error: ...` naming the culprit (exit status 1, no traceback).

    parser = command_parser(__doc__, overrides_example="model.weights=CKPT")
    parser.add_argument("--output", required=True, help="...")
    args = parser.parse_intermixed_args(argv)
    with exit_on_user_error():
        run(load_config(args.config, args.overrides))
"""
import argparse
import contextlib
import sys

from hvd_megdet.checkpoint import CheckpointError
from hvd_megdet.config import ConfigError
from hvd_megdet.data import DatasetError

# Errors in what the user gave (config, data, checkpoints): one line naming the culprit, no traceback.
USER_ERRORS = (ConfigError, DatasetError, CheckpointError)


def command_parser(doc, config_help="YAML config file", overrides_example="solver.max_iter=100"):
    """The argument parser of a command: described by the first line of `doc` (the command module's
    docstring), with the arguments every command takes: --config and the dotted key=value overrides that
    config.load_config applies. The command adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {overrides_example}")
    return parser


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a USER_ERRORS exception raised inside into the line `error: <message>` on stderr and exit status 1."""
    try:
        yield
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
