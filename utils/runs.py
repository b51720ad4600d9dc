"""Run folders: finished work is never overwritten, rewound or deleted without the user saying so.

<model_dir>/<name>/ holds config.yaml, metrics.jsonl (one line per epoch, only ever appended), last.pth
(the last completed epoch) and best.pth (the best validation mIoU so far). A new run refuses a folder
that holds a run; a resumed run refuses to go back behind what its folder already holds. Also here:
what a resumed run may change (`resume_changes`, one table for every key) and how SIGINT / SIGTERM end a
run (`interrupt_handling`, `holding_interrupts`). docs/runs.md.
"""

import json
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from common import files
from common.cli import shown
from utils.checkpoint import load_checkpoint
from utils.config import SCHEMA

CHECKPOINTS = ("last.pth", "best.pth")
RUN_FILES = ("config.yaml", "metrics.jsonl", *CHECKPOINTS)
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


# ----------------------------------------------------------------------------- names and folders
def run_folder_of(checkpoint_path) -> Path | None:
    """The run folder a checkpoint lies in (as the user's path spells it), or None for a checkpoint that
    lies elsewhere: a run folder holds last.pth / best.pth / config.yaml / metrics.jsonl."""
    path = Path(os.path.normpath(checkpoint_path))
    folder = path.parent
    if folder.name in ("", ".", ".."):  # 'last.pth' in the working folder: name the folder itself
        folder = Path(os.path.abspath(folder))
    if path.name in CHECKPOINTS or any((folder / name).is_file() for name in RUN_FILES):
        return folder
    return None


def resume_location(checkpoint_cfg: dict, checkpoint_path) -> dict:
    """Where a resumed run goes unless --model_dir / --name say otherwise: the folder its checkpoint lies
    in, even if the user moved or copied that folder (the name stored in the checkpoint may be another's).
    Returns the model_dir / name to use instead of the stored ones (empty if they name that folder)."""
    folder = run_folder_of(checkpoint_path)
    if folder is None:
        return {}
    stored = Path(str(checkpoint_cfg.get("model_dir") or "")) / str(checkpoint_cfg.get("name") or "")
    if stored.resolve() == folder.resolve():
        return {}
    return {"model_dir": str(folder.parent), "name": folder.name}


# ----------------------------------------------------------------------------- what a resumed run may change
# Every key of the schema falls in one of three classes; a key not named below follows its section:
# model keys (not execution) are refused, others are applied and recorded.
#   refused: a resumed run keeps them (its epochs train one model on one input, with one optimizer state);
#   applied: they change training from the resumed epoch on; recorded in the first new metrics line;
#   free:    how and where the run executes and logs; recorded too, but nothing is trained differently.
RESUME_REFUSED = {
    "dataset": "the model's input and classes",
    "thl": "the model's input",
    "channels": "the model's input",
    "seq_len": "the model's input",
    "optimizer": "its state (momentum or moment estimates) does not carry over to another optimizer",
    "seed": "the resumed run continues the checkpoint's random streams, so a new seed would act nowhere",
}
RESUME_APPLIED = (
    "epochs",
    "lr",
    "momentum",
    "weight_decay",
    "scheduler",
    "batch_size",
    "amp",
    "augment",
    "train_split",
    "num_train",
    "num_val",
    "void_to_background",
    "datalist",
)
RESUME_FREE = (
    "pretrained",  # the weights come from the checkpoint
    "data_root",
    "num_workers",
    "model_dir",
    "name",
    "device",
    "test_display",
    "see_model",
    "wandb",
    "cpu_malloc",
)


def resume_rule(name: str) -> str:
    """'refused', 'applied' or 'free' for a key that differs from the resumed checkpoint's."""
    key = SCHEMA.get(name)
    if name in RESUME_REFUSED or (
        key is not None and key.section == "model" and not key.execution and name not in RESUME_FREE
    ):
        return "refused"
    if name in RESUME_FREE or (key is not None and key.execution):
        return "free"
    return "applied"


def resume_changes(old: dict, new: dict, path) -> dict:
    """{key: [old value, new value]} of the settings that differ between the checkpoint's resolved config
    `old` and the new run's `new`; ValueError naming every refused one. Keys that mean nothing to the
    model (SNN-only keys of an ANN) and keys an older checkpoint does not have are not compared."""
    ann = old.get("model_type") == new.get("model_type") == "ann"
    changes = {}
    for name, value in new.items():
        if name not in old or old[name] == value or (ann and name in SCHEMA and SCHEMA[name].snn_only):
            continue
        if name in SCHEMA and SCHEMA[name].derived:
            continue  # follows from the other keys, which are compared themselves
        changes[name] = [old[name], value]
    refused = [name for name in changes if resume_rule(name) == "refused"]
    model = [n for n in refused if n not in RESUME_REFUSED or RESUME_REFUSED[n].startswith("the model")]
    if model:
        listed = shown("; ".join(f"{n} {changes[n][0]!r} -> {changes[n][1]!r}" for n in model), 400, quote=False)
        raise ValueError(
            f"{path}: a resumed run keeps the checkpoint's model; these settings differ: {listed}. "
            f"Drop those flags, or start a new run"
        )
    if refused:
        name = refused[0]
        raise ValueError(
            f"{path}: a resumed run keeps its {name} ({changes[name][0]!r}, asked for {changes[name][1]!r}): "
            f"{RESUME_REFUSED[name]}. Drop --{name}, or start a new run"
        )
    return changes


def describe_changes(changes: dict, first_epoch: int) -> str:
    """'from epoch N: lr 0.001 -> 0.5 (applied); num_workers 2 -> 0 (execution)' for the first output line."""
    if not changes:
        return ""
    parts = [
        f"{name} {shown(old, 60)} -> {shown(new, 60)}"
        + (" (how or where it runs)" if resume_rule(name) == "free" else "")
        for name, (old, new) in changes.items()
    ]
    return f"from epoch {first_epoch}: " + "; ".join(parts)


# ----------------------------------------------------------------------------- claiming a folder
def claim_run_dir(run_dir: Path, resume=None, overwrite: bool = False):
    """Check that a run may write into `run_dir`, create it and mark it as in use (LOCK);
    returns (note for the log or None, the folders it made). Release the mark with
    `release_run_dir`.

    resume: (checkpoint path, its epoch) when resuming. A new run refuses a folder that holds a run,
    finished or only started, unless `overwrite`, which renames the old folder. A resumed run may
    continue its own folder from its latest epoch, or start a new folder; anything else would rewind
    or mix runs. No run starts in a folder that a running process uses."""
    _refuse_if_running(run_dir)
    note = _check_claim(run_dir, resume, overwrite)
    absolute = Path(os.path.abspath(run_dir))
    created = [p for p in (absolute, *absolute.parents) if not p.exists()]  # the folders made now
    create_run_dir(run_dir)
    try:
        fd = os.open(run_dir / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # another process claimed it between the check and now
        _refuse_if_running(run_dir)
        raise
    with os.fdopen(fd, "w") as f:
        f.write(f"{files.HOST} {os.getpid()}\n")
    return note, created


def release_run_dir(run_dir: Path, created=()):
    """Remove the in-use mark. If this start created the folder (`created`: the folders claim_run_dir made)
    and completed no epoch, the folder holds no run file and is removed, with what this start put there
    (TensorBoard's event files), and so are the empty folders made for it: a refused or failed start
    leaves no empty run folder behind."""
    (run_dir / LOCK).unlink(missing_ok=True)
    if not created or not run_dir.is_dir() or any((run_dir / name).exists() for name in RUN_FILES):
        return
    if any(p.name != "tensorboard" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in created[1:]:  # model_dir and above, innermost first, if still empty
        try:
            folder.rmdir()
        except OSError:
            break


def resume_advice(run_dir: Path) -> str:
    """How to go on with the run in `run_dir`, naming only files that exist."""
    if (run_dir / "last.pth").is_file():
        return f"continue it with --resume {run_dir / 'last.pth'} (and a larger --epochs if it finished)"
    return "it has no last.pth to resume from"


def _refuse_if_running(run_dir: Path):
    lock = run_dir / LOCK
    try:
        host, pid = lock.read_text().split()
    except (FileNotFoundError, NotADirectoryError):
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
                f"{run_dir} already holds {what}: {resume_advice(run_dir)}; start it again with --overwrite "
                f"(the old folder is kept, renamed), or pick another --name"
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


# ----------------------------------------------------------------------------- SIGINT and SIGTERM
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (kill, a batch system, torchrun stopping its workers) ended the run;
    `message` says what was kept and how to go on. The exit code is 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message)
        self.signum, self.message = int(signum), message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_held = {"depth": 0, "pending": None}


def _on_signal(signum, frame):
    if _held["depth"]:
        _held["pending"] = _held["pending"] or signum  # acted on when the held block is done
        return
    raise RunInterrupted(signum)


@contextmanager
def interrupt_handling():
    """One handler for SIGINT and SIGTERM while the block runs: each raises RunInterrupted (a
    KeyboardInterrupt), except inside `holding_interrupts`, which delays it to the block's end. A signal
    that was ignored when the program started (a background job, nohup) stays ignored. Only the main
    thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in HANDLED_SIGNALS:
        current = signal.getsignal(sig)
        if current not in (signal.SIG_IGN, _on_signal):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def holding_interrupts():
    """SIGINT / SIGTERM wait until the block is done, then interrupt (RunInterrupted): the files of an
    epoch boundary are written together."""
    with interrupt_handling():
        _held["depth"] += 1
        try:
            yield
        finally:
            _held["depth"] -= 1
            pending = _held["pending"] if _held["depth"] == 0 else None
            if _held["depth"] == 0:
                _held["pending"] = None
        if pending is not None:
            raise RunInterrupted(pending)
