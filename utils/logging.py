"""Run logging: console lines (through tqdm so bars stay intact), metrics.jsonl, TensorBoard when
installed (the run folder's tensorboard/: the numbers of each metrics line, for `tensorboard --logdir`;
docs/runs.md), Weights & Biases only when asked (--wandb; imported lazily). Only rank 0 logs."""

import json
import math
from pathlib import Path

from tqdm import tqdm


def _jsonable(value):
    """NaN/inf are not valid JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def to_json(obj, **kwargs) -> str:
    return json.dumps(_jsonable(obj), **kwargs)


class RunLogger:
    def __init__(self, run_dir, config: dict, enabled: bool = True, use_wandb: bool = False):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        except ImportError:
            pass  # TensorBoard is optional
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError(
                    "--wandb was given but the wandb package is not installed (pip install wandb)"
                ) from None
            self.wandb = wandb
            wandb.init(project="snn-segmentation", name=config.get("name"), config=config, dir=str(self.run_dir))

    def info(self, message: str):
        if self.enabled:
            tqdm.write(message)

    def log_epoch(self, record: dict):
        """Append one epoch's record to metrics.jsonl (lines are only ever appended) and mirror its
        numbers to TensorBoard/wandb."""
        if not self.enabled:
            return
        try:
            with open(self.jsonl_path, "a+b") as f:  # appends go to the end whatever the position
                size = f.seek(0, 2)
                cut_short = size > 0 and f.seek(size - 1) >= 0 and f.read(1) != b"\n"
                # A line cut short by a killed write stays as it was; the record starts a line of its own.
                f.write((b"\n" if cut_short else b"") + (to_json(record) + "\n").encode())
        except OSError as err:
            raise OSError(f"cannot append to {self.jsonl_path}: {err.strerror or err}") from None
        step = record.get("epoch", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.tensorboard is not None:
            try:
                for key, value in numbers.items():
                    self.tensorboard.add_scalar(key, value, step)
                self.tensorboard.flush()
            except OSError as err:
                raise OSError(f"cannot write {self.run_dir / 'tensorboard'}: {err.strerror or err}") from None
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self):
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except OSError as err:
                raise OSError(f"cannot write {self.run_dir / 'tensorboard'}: {err.strerror or err}") from None
        if self.wandb is not None:
            self.wandb.finish()
