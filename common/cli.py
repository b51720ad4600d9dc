"""One place that turns expected errors into one clear line and a non-zero exit code.

train.py, test.py and converter.py end with `run_main(main)`. Bad input raises ValueError /
FileNotFoundError / OSError (and their subclasses such as CheckpointError) with a message that names
the file or value; here that becomes `error: <message>` on stderr and exit code 2, without a traceback
(`--debug` shows it). Anything else is a bug and keeps its traceback. An interrupt (Ctrl-C, SIGTERM;
utils/runs.py) prints its message (what was kept, how to go on) and exits with 128 + the signal number.
A reader that stops early (`python test.py --list | head -1`) ends the program quietly. Their parsers are
`ArgumentParser`s from here: a bad flag is one line too, not the whole usage.

Two more kinds of expected error become one line: a missing optional package (`OPTIONAL_PACKAGES`, or
an ImportError whose message already says what to `pip install`), and an error raised in a DataLoader
worker, which PyTorch re-raises in the main process as "Caught ValueError in DataLoader worker process 0.
Original Traceback ...": the line is the worker's own message (`worker_message`).

Under torchrun, an `error:` line is also written to the error file torchrun names (TORCHELASTIC_ERROR_FILE), so
that torchrun's failure summary shows it ("traceback : error: ...") instead of a link. torchrun itself
still prints a traceback of its own launcher after any worker that exits non-zero (it re-raises its
ChildFailedError; nothing a worker does short of exiting 0 avoids that): docs/runs.md.
"""

import argparse
import json
import os
import re
import sys
import time


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says why and what was kept."""


EXPECTED_ERRORS = (ValueError, OSError, TrainingStopped)
BROKEN_PIPE_EXIT = 141  # what a shell reports for a program ended by SIGPIPE
INTERRUPT_EXIT = 130  # 128 + SIGINT
MAX_MESSAGE_CHARS = 2000  # a message quoting a huge value is cut in the middle
# Packages the project imports only for some work: a missing one is one line naming what to install.
OPTIONAL_PACKAGES = {
    "hdf5plugin": "reading or writing DSEC events.h5 (Blosc-compressed): pip install hdf5plugin",
    "nir": "NIR export (converter.py export-nir): pip install nir",
    "wandb": "--wandb: pip install wandb",
    "spikingjelly": "the SpikingJelly comparison: pip install --no-deps -r requirements-peers.txt",
    "tonic": "the SpikingJelly comparison's event data: pip install --no-deps -r requirements-peers.txt",
    "snntorch": "reading NIR graphs with snnTorch: pip install snntorch",
    "norse": "reading NIR graphs with Norse: pip install norse",
}
_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\s*\nOriginal Traceback")
_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'|import of ([\w.]+) halted")


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


def worker_message(err: BaseException) -> str | None:
    """The message of the error a DataLoader worker raised, from the error PyTorch re-raises for it in the
    main process (its text holds the worker's whole traceback; the message is its last entry), or None
    if `err` is not such an error."""
    text = str(err)
    found = _WORKER.match(text)
    if not found:
        return None
    name = re.escape(found.group(1))
    lines = text.rstrip("\n").split("\n")
    for index in range(len(lines) - 1, 0, -1):  # the last line "ValueError: ..." or "pkg.mod.Error: ..."
        head = re.match(rf"(?:[\w.]+\.)?{name}(?:: (.*))?$", lines[index])
        if head:
            return "\n".join([head.group(1) or "", *lines[index + 1 :]]).strip() or found.group(1)
    return lines[-1].strip()


def missing_package_message(err: ImportError, text: str | None = None) -> str | None:
    """One line for an ImportError of a missing optional package (or one whose message already says what
    to pip install); None for any other ImportError (a bug: it keeps its traceback)."""
    text = str(err) if text is None else text
    name = getattr(err, "name", None)
    if not name:
        found = _MISSING_MODULE.search(text)
        name = found and (found.group(1) or found.group(2))
    top = (name or "").split(".")[0]
    if top in OPTIONAL_PACKAGES:
        return f"the optional package {top!r} is not installed; it is needed for {OPTIONAL_PACKAGES[top]}"
    if "pip install" in text:
        return text.strip()
    return None


def expected_message(err: BaseException) -> str | None:
    """The one line for an expected error (see the module's doc), or None for a bug."""
    text = worker_message(err)
    if isinstance(err, ImportError):
        return missing_package_message(err, text)
    if isinstance(err, EXPECTED_ERRORS):
        return text if text is not None else str(err) or type(err).__name__
    return None


def tell_torchrun(message: str):
    """Under torchrun: write `message` to the error file it reads for its failure summary (the format of
    torch.distributed.elastic's ErrorHandler, message as a string). Elsewhere nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # torchrun then reports the exit code alone, as without the file


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
    except (*EXPECTED_ERRORS, ImportError) as err:
        message = expected_message(err)
        if debug or message is None:
            raise
        print(f"error: {_cut(message)}  (run with --debug for the traceback)", file=sys.stderr)
        tell_torchrun(f"error: {_cut(message)}")
        return 2
    return 0
