"""What every command-line entry point shares: flags defined on demand, user errors
as one line.

Importing a CLI module defines no absl flags (so modules can be imported side by side
and from notebooks); `run(main, define_flags, program)` defines them, then runs `main`
under `absl.app` with third-party INFO logging filtered out. A user error (bad config,
data, checkpoint, export or argument: the `USER_ERRORS` types) prints
`<program>: error: <message>` without a traceback and exits with status 2; `--verbose`
shows the traceback. `--help` prints the module's docstring and flags and exits 0.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import traceback
from typing import Callable

from absl import app
from absl import flags
from absl import logging

USER_ERRORS = (ValueError, OSError, KeyError)
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "--helpfull", "-?")


def no_arguments(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None],
        program: str) -> None:
  """Defines the program's flags (and --verbose), then runs `main` with app.run.

  `program` names the command in error messages (e.g. 'tigerfg-export').
  """
  define_flags()
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the traceback of an error.")

  def fail(message: str) -> None:
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)

  def parse(argv: list[str]) -> list[str]:
    if any(arg in HELP_FLAGS for arg in argv[1:]):
      print((sys.modules[main.__module__].__doc__ or "").strip() + "\n")
      print(flags.FLAGS.main_module_help())
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except flags.Error as error:  # a bad value or a missing required flag.
      fail(f"{error} (--help lists the flags)")
    except (AttributeError, KeyError) as error:  # config_flags: an unknown config key.
      fail(_unknown_config_key(str(error).strip("'\""), argv))
    return []

  def guarded(argv):
    try:
      main(argv)
    except USER_ERRORS as error:
      if flags.FLAGS.verbose:
        traceback.print_exc()
      message = str(error).strip("'\"") if isinstance(error, KeyError) else str(error)
      print(f"{program}: error: {message}", file=sys.stderr)
      if not flags.FLAGS.verbose:
        print(f"{program}: (--verbose shows the traceback)", file=sys.stderr)
      sys.exit(2)

  def quiet_then_main(argv):
    logging.get_absl_handler().addFilter(_own_info_only)
    guarded(argv)

  app.run(quiet_then_main, flags_parser=parse)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _own_info_only(record: std_logging.LogRecord) -> bool:
  """Keeps this package's INFO lines and everyone's warnings and errors (third-party
  INFO chatter, e.g. Orbax's per-save lines, is dropped)."""
  return record.levelno > std_logging.INFO or record.pathname.startswith(_PACKAGE_DIR)


def _unknown_config_key(name: str, argv: list[str]) -> str:
  """The message for an override naming a key the config does not have."""
  culprits = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")
              and name in arg.split("=")[0].removeprefix("--").split(".")]
  flag = culprits[0] if culprits else f"--config...{name}"
  return (f"{flag}: the config has no key {name!r} (every key is listed in "
          "tigerfg_jax/config_lib.py; `--config.KEY=VALUE` overrides an existing key)")
