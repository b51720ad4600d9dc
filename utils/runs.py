"""Run folders: finished work is never overwritten, rewound or deleted without the user saying so.

<model_dir>/<name>/ holds config.yaml, metrics.jsonl (one line per epoch, only ever appended), last.pth
(the last completed epoch) and best.pth (the best validation mIoU so far). A new run refuses a folder
that holds a run; a resumed run refuses to go back behind what its folder already holds. docs/runs.md.
"""
import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from utils.checkpoint import load_checkpoint

CHECKPOINTS = ("last.pth", "best.pth")


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
    written), or None if it holds no run (at most config.yaml of a run stopped in its first epoch)."""
    epochs = [int(load_checkpoint(run_dir / name)["epoch"]) for name in CHECKPOINTS if (run_dir / name).is_file()]
    epochs += [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl") if "checkpoint_error" not in r]
    return max(epochs) if epochs else None


def claim_run_dir(run_dir: Path, resume=None, overwrite: bool = False):
    """Check that a run may write into `run_dir`; returns a note for the log or None.

    resume: (checkpoint path, its epoch) when resuming. A new run refuses a folder holding a run unless
    `overwrite`, which moves the old folder aside. A resumed run may continue its own folder from its
    latest epoch, or start a folder that holds no run; anything else would rewind or mix runs."""
    held = saved_epoch(run_dir) if run_dir.is_dir() else None
    if resume is None:
        if held is None:
            return None
        if not overwrite:
            raise ValueError(f"{run_dir} already holds a run (epochs up to {held}): continue it with "
                             f"--resume {run_dir / 'last.pth'} (and a larger --epochs if it finished), start it "
                             f"again with --overwrite (the old folder is kept, renamed), or pick another --name")
        return f"moved the previous run to {set_aside(run_dir)}"
    path, epoch = resume
    if overwrite:
        raise ValueError("--overwrite starts a run afresh; it cannot be combined with --resume")
    own = Path(path).resolve().parent == run_dir.resolve()
    if held is None:
        return None if own else f"continuing {path} (epoch {epoch}) in the new run folder {run_dir}"
    if not own:
        raise ValueError(f"{run_dir} holds another run (epochs up to {held}); to continue {path} there would mix "
                         f"two runs: pick a new folder with --name")
    if held > epoch:
        raise ValueError(f"{run_dir} already holds epochs up to {held}; resuming {path} (epoch {epoch}) there "
                         f"would rewind it: resume from {run_dir / 'last.pth'}, or continue from {path} in a new "
                         f"run folder with --name")
    return None


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
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
