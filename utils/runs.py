"""Run folders: finished work is never overwritten, rewound or deleted without the user saying so.

<model_dir>/<name>/ holds config.yaml, metrics.jsonl (one line per epoch, only ever appended), last.pth
(the last completed epoch) and best.pth (the best validation mIoU so far). A new run refuses a folder
that holds a run; a resumed run refuses to go back behind what its folder already holds. docs/runs.md.
"""

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from utils import files
from utils.checkpoint import load_checkpoint

CHECKPOINTS = ("last.pth", "best.pth")
LOCK = ".running"  # "<host> <pid>" of the process training in the folder


def read_metrics(path) -> list:
    """The records of a metrics.jsonl; a line cut short by a killed write is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def saved_epoch(run_dir: Path):
    """The last epoch whose results `run_dir` holds (checkpoints, and metrics lines whose checkpoint was
    written), or None if none was completed."""
    epochs = [int(load_checkpoint(run_dir / name)["epoch"]) for name in CHECKPOINTS if (run_dir / name).is_file()]
    epochs += [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl") if "checkpoint_error" not in r]
    return max(epochs) if epochs else None


def claim_run_dir(run_dir: Path, resume=None, overwrite: bool = False):
    """Check that a run may write into `run_dir`, create it and mark it as in use (LOCK);
    returns a note for the log, or None. Release the mark with `release_run_dir`.

    resume: (checkpoint path, its epoch) when resuming. A new run refuses a folder that holds a run,
    finished or only started, unless `overwrite`, which renames the old folder. A resumed run may
    continue its own folder from its latest epoch, or start a new folder; anything else would rewind
    or mix runs. No run starts in a folder that a running process uses."""
    _refuse_if_running(run_dir)
    note = _check_claim(run_dir, resume, overwrite)
    create_run_dir(run_dir)
    try:
        fd = os.open(run_dir / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # another process claimed it between the check and now
        _refuse_if_running(run_dir)
        raise
    with os.fdopen(fd, "w") as f:
        f.write(f"{files.HOST} {os.getpid()}\n")
    return note


def release_run_dir(run_dir: Path):
    (run_dir / LOCK).unlink(missing_ok=True)


def _refuse_if_running(run_dir: Path):
    lock = run_dir / LOCK
    try:
        host, pid = lock.read_text().split()
    except FileNotFoundError:
        return
    except ValueError:
        host, pid = "?", "?"
    if host == files.HOST and pid.isdigit() and not files.process_alive(int(pid)):
        lock.unlink(missing_ok=True)  # left by a run that was killed
        return
    raise ValueError(
        f"{run_dir} is in use by a running training (process {pid} on {host}); wait for it to end, "
        f"or pick another --name (if that run has ended, delete {lock})"
    )


def _check_claim(run_dir: Path, resume, overwrite: bool):
    held = saved_epoch(run_dir) if run_dir.is_dir() else None
    started = held is not None or (run_dir / "config.yaml").is_file()
    what = f"a run (epochs up to {held})" if held is not None else "a run that was started but completed no epoch"
    if resume is None:
        if not started:
            return None
        if not overwrite:
            raise ValueError(
                f"{run_dir} already holds {what}: continue it with --resume {run_dir / 'last.pth'} "
                f"(and a larger --epochs if it finished), start it again with --overwrite (the old "
                f"folder is kept, renamed), or pick another --name"
            )
        return f"moved the previous run to {set_aside(run_dir)}"
    path, epoch = resume
    if overwrite:
        raise ValueError("--overwrite starts a run afresh; it cannot be combined with --resume")
    own = Path(path).resolve().parent == run_dir.resolve()
    if not own and started:
        raise ValueError(
            f"{run_dir} holds another run; continuing {path} there would mix two runs: pick a new folder with --name"
        )
    if not own:
        return f"continuing {path} (epoch {epoch}) in the new run folder {run_dir}"
    if held is not None and held > epoch:
        raise ValueError(
            f"{run_dir} already holds epochs up to {held}; resuming {path} (epoch {epoch}) there "
            f"would rewind it: resume from {run_dir / 'last.pth'}, or continue from {path} in a new "
            f"run folder with --name"
        )
    return None


def create_run_dir(run_dir: Path):
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the run folder {run_dir}: {err.strerror or err}") from None


def set_aside(run_dir: Path) -> Path:
    """Rename `run_dir` to <name>.replaced-<time> (numbered if taken); nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    run_dir.rename(target)
    return target


@contextmanager
def holding_interrupts():
    """Ctrl-C (SIGINT) waits until the block is done, then interrupts as usual: the files of an epoch
    boundary are written together. Only the main thread can hold signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield  # signals can only be held in the main thread; an ignored Ctrl-C stays ignored
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
