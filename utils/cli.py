"""One place that turns expected errors into one clear line and a non-zero exit code.

train.py, test.py and converter.py end with `run_main(main)`. Bad input raises ValueError /
FileNotFoundError / OSError (and their subclasses such as CheckpointError) with a message that names
the file or value; here that becomes `error: <message>` on stderr and exit code 2, without a traceback
(`--debug` shows it). Anything else is a bug and keeps its traceback. A reader that stops early
(`python test.py --list | head -1`) ends the program quietly. Their parsers are `ArgumentParser`s
from here: a bad flag is one line too, not the whole usage.
"""

import argparse
import os
import sys


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says why and what was kept."""


EXPECTED_ERRORS = (ValueError, OSError, TrainingStopped)
BROKEN_PIPE_EXIT = 141  # what a shell reports for a program ended by SIGPIPE


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}  (see {self.prog} --help)\n")


def _quiet_broken_pipe() -> int:
    # Python would report the failed flush of stdout at exit once more: point stdout at /dev/null first.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return BROKEN_PIPE_EXIT


def run_main(main, argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        main(argv)
        sys.stdout.flush()  # a closed pipe shows up here when the output was buffered
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        if debug:
            raise
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        message = str(err) or type(err).__name__
        print(f"error: {message}  (run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0
