"""One place that turns expected errors into one clear line and a non-zero exit code.

train.py, test.py and converter.py end with `run_main(main)`. Bad input raises ValueError /
FileNotFoundError / OSError (and their subclasses such as CheckpointError) with a message that names
the file or value; here that becomes `error: <message>` on stderr and exit code 2, without a traceback
(`--debug` shows it). Anything else is a bug and keeps its traceback. An interrupt (Ctrl-C, SIGTERM;
utils/runs.py) prints its message (what was kept, how to go on) and exits with 128 + the signal number.
A reader that stops early (`python test.py --list | head -1`) ends the program quietly. Their parsers are
`ArgumentParser`s from here: a bad flag is one line too, not the whole usage.
"""

import argparse
import os
import sys


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says why and what was kept."""


EXPECTED_ERRORS = (ValueError, OSError, TrainingStopped)
BROKEN_PIPE_EXIT = 141  # what a shell reports for a program ended by SIGPIPE
INTERRUPT_EXIT = 130  # 128 + SIGINT
MAX_MESSAGE_CHARS = 2000  # a message quoting a huge value is cut in the middle


def shown(value, limit: int = 100, quote: bool = True) -> str:
    """repr() of a value for a message (the text itself for a string if not `quote`), cut to about `limit`
    characters: a 100 MB string in a config file must not become a 100 MB error line."""
    text = repr(value) if quote or not isinstance(value, str) else value
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}...({len(text):,} characters)"


def _cut(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    half = MAX_MESSAGE_CHARS // 2
    return f"{message[:half]} ...({len(message) - 2 * half:,} characters cut)... {message[-half:]}"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {_cut(message)}  (see {self.prog} --help)\n")


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
    except KeyboardInterrupt as err:
        start = "\n" if sys.stderr.isatty() else ""  # past a progress bar
        print(start + (getattr(err, "message", "") or "interrupted"), file=sys.stderr, flush=True)
        if debug:
            raise
        return getattr(err, "exit_code", INTERRUPT_EXIT)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        message = _cut(str(err) or type(err).__name__)
        print(f"error: {message}  (run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0
