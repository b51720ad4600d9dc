"""One place that turns expected errors into one clear line and a non-zero exit code.

train.py, test.py and converter.py end with `run_main(main)`. Bad input raises ValueError /
FileNotFoundError / OSError (and their subclasses such as CheckpointError) with a message that names
the file or value; here that becomes `error: <message>` on stderr and exit code 2, without a traceback
(`--debug` shows it). Anything else is a bug and keeps its traceback.
"""
import sys


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says why and what was kept."""


EXPECTED_ERRORS = (ValueError, OSError, TrainingStopped)


def run_main(main, argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        if debug:
            raise
        return 130
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        message = str(err) or type(err).__name__
        print(f"error: {message}  (run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0
