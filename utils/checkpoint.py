"""One checkpoint format for the whole project (docs/design.md, section 11).

A checkpoint is a dict that loads with `torch.load(path, weights_only=True)`:
  format='snnseg-1', config (full resolved flat config), state_dict, and for training runs
  optimizer, scheduler, epoch, best_miou, rng; conversion adds thresholds[type][str(T)].
Writes are atomic (temp file in the same folder, then os.replace; common/files.py), so a crash or Ctrl-C
never leaves a half-written checkpoint behind; new files get the umask's permissions. Loading never
unpickles code: weights_only=True only.
"""

import pickle
import re
from pathlib import Path

import torch

from common.files import atomic_write
from models import build_model
from models.neurons import state_dict_neuron_errors
from utils.config import SCHEMA

FORMAT = "snnseg-1"
REQUIRED_KEYS = ("format", "config", "state_dict")
PAPER_REPO_KEYS = {"max_miou"}  # the paper's own checkpoints carry these instead of 'format'


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file and the problem."""


class _WriteRecorder:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports it as a RuntimeError of
    its zip writer ('unexpected pos ...') that does not say why."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        self.file.flush()


def _torch_save(checkpoint: dict, file):
    recorder = _WriteRecorder(file)
    try:
        torch.save(checkpoint, recorder)
    except RuntimeError:
        if recorder.error is not None:
            raise recorder.error from None
        raise


def save_checkpoint(path, checkpoint: dict):
    """Write `checkpoint` to `path` atomically (common/files.py): readers see the old file or the new one,
    never half; a failed write is a WriteError naming the path, the old file left as it was."""
    atomic_write(path, lambda file: _torch_save(checkpoint, file))


def _read_file(path: Path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)", text)
        if found:  # the pickle names a Python callable/class: the way a checkpoint carries code
            raise CheckpointError(
                f"{path}: refused to load: the file holds Python objects or code ({found.group(1) or found.group(2)}) "
                f"that a weights-only checkpoint never contains; nothing in it was executed. "
                f"Only use checkpoints you trust."
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = reason.group(1).strip() if reason else text.splitlines()[0]
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (unreadable as weights: {reason})") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # any other parse failure (bad zip, bad magic number, truncated): not a checkpoint
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (torch.load failed: {type(err).__name__}: {reason})"
        ) from None


def validate_checkpoint(checkpoint, path) -> dict:
    """Check the structure of a loaded checkpoint; the error names what is missing or wrong."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: not a snnseg checkpoint: expected a dict with keys "
            f"{', '.join(REQUIRED_KEYS)}, found a {type(checkpoint).__name__}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        hint = ""
        if PAPER_REPO_KEYS & checkpoint.keys():
            hint = (
                " (it looks like a checkpoint of the paper's repository: "
                "import it with `python converter.py import-paper`)"
            )
        raise CheckpointError(f"{path}: not a snnseg checkpoint: missing key(s) {', '.join(map(repr, missing))}{hint}")
    if checkpoint["format"] != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {checkpoint['format']!r} (expected {FORMAT!r})")
    if not isinstance(checkpoint["config"], dict):
        raise CheckpointError(f"{path}: 'config' must be a dict, found a {type(checkpoint['config']).__name__}")
    for key in ("model_type", "arch"):
        if key not in checkpoint["config"]:
            raise CheckpointError(f"{path}: the checkpoint's config has no {key!r}")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' must be a dict of tensors")
    return checkpoint


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and validate a checkpoint with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    return validate_checkpoint(_read_file(path, map_location), path)


# ----------------------------------------------------------------------------- what a file is
# The kinds of checkpoint the project writes, told by content (an output replaces only its own kind;
# common/files.py, check_replace): 'training' (train.py: optimizer state; never replaced by another
# command), 'converted' (test.py --save_snn), 'imported' (converter.py import-paper), 'paper' (a checkpoint
# of the paper's repository, as converter.py thresholds / state-dict write them), 'model' (any other).
def checkpoint_kind(path) -> str | None:
    """The kind of checkpoint at `path` (above), or None if it is not a checkpoint. Never raises."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap needs the zip format; older files are read whole
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(checkpoint, dict):
        return None
    if checkpoint.get("format") != FORMAT:
        return "paper" if PAPER_REPO_KEYS & checkpoint.keys() and "state_dict" in checkpoint else None
    if "optimizer" in checkpoint:
        return "training"
    if "conversion" in checkpoint:
        return "converted"
    return "imported" if "imported_from" in checkpoint else "model"


def is_converted_snn(path) -> bool:
    return checkpoint_kind(path) == "converted"


def load_state(model: torch.nn.Module, state_dict: dict, source, config: dict):
    """load_state_dict(strict) with a readable error when the weights belong to another architecture."""
    if config.get("model_type", "snn") == "snn":  # weights of another neuron model (e.g. plif's leak)
        problem = state_dict_neuron_errors(config.get("neuron", "lif"), state_dict)
        if problem:
            raise CheckpointError(f"{source}: {problem}; config key 'neuron' must be the checkpoint's")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    # A neuron's threshold takes the stored shape (channel- or neuron-wise thresholds of converted SNNs).
    mismatched = [
        k for k in own if k in state_dict and own[k].shape != state_dict[k].shape and not k.endswith("act.threshold")
    ]
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(
            f"{source}: its weights do not fit the model {config.get('model_type')} {config.get('arch')} "
            f"(num_classes={config.get('num_classes')}, in_channels={config.get('in_channels')}): "
            f"the checkpoint was made for another architecture; {'; '.join(details)}"
        )
    # load_state_dict would copy integer (or boolean) values into float weights without a word
    wrong = [k for k in own if own[k].is_floating_point() and not state_dict[k].is_floating_point()]
    if wrong:
        raise CheckpointError(
            f"{source}: {wrong[0]!r} holds {str(state_dict[wrong[0]].dtype).replace('torch.', '')} values where "
            f"the model has floating-point weights ({len(wrong)} such tensor(s)); the file is not a trained model"
        )
    model.load_state_dict(state_dict)


def build_model_from_checkpoint(checkpoint: dict, source, overrides: dict | None = None) -> torch.nn.Module:
    """Rebuild the model from the checkpoint's config (plus overrides) and load its weights."""
    # Keys of older versions are dropped; the weights come from the checkpoint, not from 'pretrained'.
    config = {k: v for k, v in {**checkpoint["config"], **(overrides or {})}.items() if k in SCHEMA}
    model = build_model({**config, "pretrained": None}, SCHEMA)
    load_state(model, checkpoint["state_dict"], source, config)
    return model.eval()


def load_model(path, overrides: dict | None = None, map_location="cpu") -> torch.nn.Module:
    """The model stored in checkpoint `path`, weights loaded, in eval mode."""
    checkpoint = load_checkpoint(path, map_location)
    return build_model_from_checkpoint(checkpoint, path, overrides)
