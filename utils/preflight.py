"""Checks before any work: every path a command reads or writes, and whether the work fits the machine.

    check_inputs([("--model_path", path, "file"), ("data_root", root, "any")])
    check_outputs([("--results", path, "file"), ("--plot_dir", folder, "folder")], inputs=[...])
    check_memory(cfg, batch, timesteps, (height, width), device, training=False, what="the evaluation")
    check_export_memory(cfg, (height, width))

train.py, test.py and converter.py call these before they load data or evaluate, so that a missing
input, an output that cannot be written (or would replace one of the inputs) and work that cannot fit
in memory are one line at the start, not a failure at the end. docs/runs.md, section "Checks before
any work", states the memory estimate.
"""

import functools
import json
import os
from pathlib import Path

import torch

import models
from common import files

# ----------------------------------------------------------------------------- paths
KINDS = ("file", "folder", "any")


def _given(items):
    return [(what, Path(path), kind) for what, path, kind in items if path not in (None, "")]


def check_inputs(items):
    """Each (what, path, kind) must exist, be a file / a folder (kind 'any': either) and be readable;
    the error names `what` (the flag or key) and the path."""
    for what, path, kind in _given(items):
        assert kind in KINDS, kind
        if not path.exists():
            raise FileNotFoundError(f"{what} {path} not found (no such file or folder)")
        if kind == "file" and path.is_dir():
            raise ValueError(f"{what} {path} is a folder, not a file")
        if kind == "folder" and not path.is_dir():
            raise ValueError(f"{what} {path} is a file, not a folder")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise ValueError(f"{what} {path} is not readable (permission denied)")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(items, inputs=()):
    """Each (what, path, kind) can be written (kind 'file': a file there; 'folder': files in that folder)
    without writing anything; no output is one of the `inputs` (what, path, kind) or another output:
    a command never replaces what it reads, nor writes two results into one file."""
    outputs, inputs = _given(items), _given(inputs)
    for index, (what, path, kind) in enumerate(outputs):
        assert kind in ("file", "folder"), kind
        for other_what, other, _ in [*inputs, *outputs[:index]]:
            if os.path.realpath(path) == os.path.realpath(other) or _same_file(path, other):
                raise ValueError(
                    f"{what} {path} is the same file as {other_what} {other}: it would be replaced; "
                    f"write to another path"
                )
        if kind == "file":
            problem = files.output_problem(path)
        else:
            problem = ("it is a file" if path.exists() and not path.is_dir() else None) or files.folder_problem(path)
        if problem:
            raise ValueError(f"{what} {path} cannot be written: {problem}")


# ----------------------------------------------------------------------------- memory
# The estimate (docs/runs.md): a network's activations grow with the pixels, the timesteps and the batch.
#   per pixel and timestep, measured once on a 64x64 probe of the architecture (ANN twin, one sample):
#     A_sum = the outputs of all its layers together, A_max = the largest output of one layer;
#   training (every layer's activations of all T steps are kept for backward; an SNN keeps its spikes,
#   one byte each, an ANN float32 values):
#     A_sum x H x W x T x batch x (1 or 4) bytes x TRAIN_FACTOR  (+ the weights, their gradients and two
#     optimizer moments: 4 x parameters x 4 bytes)
#   evaluation (layer by layer; a layer's input and output of all T steps are alive at once):
#     A_max x H x W x T x batch x 4 bytes x EVAL_FACTOR  (+ the weights)
#   NIR export (converter.py export-nir; one value per neuron for each of its parameters, written with
#   gzip): A_sum x H x W x EXPORT_BYTES (+ the weights twice); measured peaks of dl-vgg9 at 128-512 px
#   were 16 to 17 bytes per A_sum x pixel.
# memory_saving keeps only memory_block steps for backward. The factors are safety margins over what
# the tensors themselves need (temporaries, the allocator's slack); measured peaks of dl-vgg9 on the CPU
# (96-128 px, T 1-32, batch 1-8) were 0.4 to 1 times the estimate. Work is refused only when the estimate
# exceeds all the memory available to the device now.
BYTES_PER_VALUE = 4  # float32
SPIKE_BYTES = 1  # what an SNN keeps of a spike for backward
TRAIN_FACTOR = 2.0
EVAL_FACTOR = 3.0
PROBE_SIZE = 64
EXPORT_BYTES = 24  # per A_sum x pixel of a NIR export, with a margin over the measured 16-17


@functools.lru_cache(maxsize=8)
def _profile(model_cfg_json: str):
    cfg = json.loads(model_cfg_json)
    twin = models.build_model(cfg).eval()
    sizes = []

    def record(module, args, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel())

    hooks = [m.register_forward_hook(record) for m in twin.modules() if not list(m.children())]
    probe = torch.zeros(1, cfg["in_channels"], PROBE_SIZE, PROBE_SIZE)
    try:
        with torch.no_grad():
            twin(probe.unsqueeze(0) if twin.config["encoder"] == "sequence" and twin.spiking else probe)
    finally:
        for hook in hooks:
            hook.remove()
    pixels = PROBE_SIZE * PROBE_SIZE
    params = sum(p.numel() for p in twin.parameters())
    return sum(sizes) / pixels, max(sizes) / pixels, params


def activation_profile(cfg: dict):
    """(A_sum, A_max, parameters) of the architecture of `cfg`, from its ANN twin on a probe input (an
    architecture without one: itself at one timestep)."""
    keys = ("arch", "in_channels", "num_classes", "bn", "conv_bias", "leaky", "alpha")
    twin = {k: cfg[k] for k in keys if k in cfg}
    twin.update(model_type="ann", pretrained=None, memory_saving=False, compile=False, img_size=[PROBE_SIZE] * 2)
    if not models.get_architecture(twin["arch"])[0].ann_twin:
        twin.update(model_type="snn", timesteps=1)
    return _profile(json.dumps(twin, sort_keys=True))


def estimate_bytes(cfg: dict, batch: int, timesteps: int, size, training: bool) -> int:
    """Bytes that a training step / an evaluation batch needs, by the estimate above."""
    a_sum, a_max, params = activation_profile(cfg)
    height, width = size
    steps = timesteps
    if training and cfg.get("memory_saving"):
        steps = min(steps, int(cfg.get("memory_block") or steps))
    pixels = float(height) * float(width) * steps * batch
    if training:
        stored = SPIKE_BYTES if cfg.get("model_type") == "snn" else BYTES_PER_VALUE
        return int(a_sum * pixels * stored * TRAIN_FACTOR + 4 * params * BYTES_PER_VALUE)
    return int(a_max * pixels * BYTES_PER_VALUE * EVAL_FACTOR + params * BYTES_PER_VALUE)


def _meminfo_available():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available():
    """What a container's memory limit (cgroup v2) leaves, or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_bytes(device) -> int | None:
    """Memory available to `device` now: free GPU memory (torch.cuda.mem_get_info), or for the CPU the
    kernel's MemAvailable (within a container's limit). None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(known) if known else None


def _gb(n) -> str:
    return f"{n / 1e12:.3g} TB" if n >= 1e12 else f"{n / 1e9:.3g} GB"


def check_memory(cfg: dict, batch: int, timesteps: int, size, device, training: bool, what: str, lower: str):
    """ValueError before any work if the estimate for (batch, timesteps, size) exceeds the memory available
    to `device`; `lower` names the settings to lower."""
    need = estimate_bytes(cfg, batch, timesteps, size, training)
    have = available_bytes(device)
    if have is not None and need > have:
        height, width = size
        raise ValueError(
            f"{what} needs about {_gb(need)} of memory ({cfg['arch']} at {height}x{width}, T={timesteps}, "
            f"batch {batch}; the estimate is in docs/runs.md), more than the {_gb(have)} available on "
            f"{torch.device(device)}: lower {lower}"
        )
    return need


def check_export_memory(cfg: dict, size, lower: str = "--input-size"):
    """ValueError before any work if a NIR export at `size` (H, W) needs more than the CPU's available
    memory (the estimate above)."""
    a_sum, _, params = activation_profile(cfg)
    height, width = size
    need = int(a_sum * float(height) * float(width) * EXPORT_BYTES + 2 * params * BYTES_PER_VALUE)
    have = available_bytes("cpu")
    if have is not None and need > have:
        raise ValueError(
            f"the NIR export needs about {_gb(need)} of memory ({cfg['arch']} at {height}x{width}: NIR stores "
            f"every neuron's parameters; the estimate is in docs/runs.md), more than the {_gb(have)} available: "
            f"lower {lower}"
        )
    return need


def largest_input_size(dataset, cfg: dict):
    """(height, width) of the largest input `dataset` gives: the configured img_size, else (native size)
    the largest image (VOC: read from the JPEG headers, no pixels decoded; others: the first item);
    None at the native size without a dataset."""
    size = cfg.get("img_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    if dataset is None:
        return None
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    ids, voc_dir = getattr(dataset, "ids", None), getattr(dataset, "voc_dir", None)
    if ids is not None and voc_dir is not None:
        from PIL import Image

        largest, limit = (0, 0), Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # only the header is read: PIL's guard against huge images is not needed
        try:
            for name in ids:
                try:
                    with Image.open(Path(voc_dir) / "JPEGImages" / f"{name}.jpg") as image:
                        width, height = image.size
                except OSError:
                    continue  # reading the item names the broken file
                if height * width > largest[0] * largest[1]:
                    largest = (height, width)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        return largest if largest != (0, 0) else None
    if len(dataset) == 0:
        return None
    x = dataset[0][0]
    return int(x.shape[-2]), int(x.shape[-1])
