"""Speed and memory of SNN training and inference, with the compute floor measured in the same process.

    python benchmarks/bench.py --arch dl-vgg9 --timesteps 10 --batch_size 4 --img_size 64 --steps 3
    python benchmarks/bench.py --device cuda --shape voc64 --baseline --steps 10

Phases, in this order (benchmarks/README.md describes every field):

1. The SNN trains alone: one warm-up step, then ``--steps`` timed full SGD steps (``solo_step_s``, their
   median; ``peak_rss_mb`` and, on CUDA, ``peak_cuda_mb`` are this phase's peaks).
2. Inference throughput without gradients (``eval_img_per_s``).
3. The floor: the same convolutions, BN and ReLU as an ANN over a batch of N*T images, i.e. what the
   SNN's convolutions cost at the least. SNN and floor steps then alternate ``--steps`` times and
   ``step_s`` / ``bound_step_s`` are their medians: both see the same machine and the same state of
   the C heap, which moves either by 10-20 % on its own (see utils/allocator.py).
4. ``--baseline``: the same weights run by the per-timestep loop of benchmarks/baseline.py (the paper's
   execution), trained and evaluated the same way (``baseline_*`` fields and the speedups over it).
   It comes after the floor so that the flag does not change the C heap the SNN's figures see.
5. On CUDA: one more training step under torch.profiler counts the kernels it launches
   (``cuda_launches_per_step`` and friends; see ``count_cuda_work``) and lists the 15 kernels with the
   most GPU time (``cuda_top_kernels``). Last, so that the profiler slows no timed step.

``--shape`` picks the input: ``cpu`` (default: T=10, batch 4, 64x64 images), ``voc64`` (T=20, batch 16,
64x64 images: the GPU table's row) or ``ddd17`` (T=20, batch 8, 2-channel 200x346 event frames, 6
classes); ``--timesteps --batch_size --img_size --in_channels --num_classes --encoder`` override it.
``--path per-timestep`` trains the baseline loop instead of the multi-step network.
The last printed line is one JSON object.
"""

import argparse
import json
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo is not installed

from benchmarks.baseline import per_timestep_forward  # noqa: E402
from data.transforms import IGNORE_INDEX  # noqa: E402
from models import ARCHITECTURES, NEURONS, build_model, resolve_model_config  # noqa: E402
from models.config import compile_problem  # noqa: E402
from utils.allocator import POLICIES, set_cpu_malloc  # noqa: E402
from utils.config import parse_size  # noqa: E402

# What each --shape feeds; explicit flags override single entries.
SHAPES = {
    "cpu": dict(
        timesteps=10, batch_size=4, img_size=[64, 64], in_channels=3, num_classes=21, encoder="poisson", input="images"
    ),
    "voc64": dict(
        timesteps=20, batch_size=16, img_size=[64, 64], in_channels=3, num_classes=21, encoder="poisson", input="images"
    ),
    "ddd17": dict(
        timesteps=20, batch_size=8, img_size=[200, 346], in_channels=2, num_classes=6, encoder="poisson", input="events"
    ),
}
EVENT_DENSITY, EVENTS_PER_PIXEL = 0.05, 2.0  # synthetic event frames: active pixels, mean count where active


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="dl-vgg9", choices=sorted(ARCHITECTURES))
    p.add_argument(
        "--shape",
        default="cpu",
        choices=sorted(SHAPES),
        help="input preset (T, batch, size, channels, classes, encoder); the flags below override it",
    )
    p.add_argument("--timesteps", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--img_size", type=int, nargs="+", metavar="SIZE", help="S (square) or H W")
    p.add_argument("--in_channels", type=int)
    p.add_argument("--num_classes", type=int)
    p.add_argument("--encoder", choices=["poisson", "direct"])
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--eval_batches", type=int, default=3)
    p.add_argument("--full_prop", action="store_true")
    p.add_argument(
        "--memory_saving",
        action="store_true",
        help="replay blocks of --memory_block timesteps in backward, recomputing each spiking conv",
    )
    p.add_argument("--memory_block", type=int, default=4)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CPU and GPU)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="model config key 'compile': torch.compile the torch neuron backend's per-timestep steps",
    )
    p.add_argument(
        "--compile_model",
        action="store_true",
        help="torch.compile the whole model (the fused neurons run as custom ops inside the compiled graph)",
    )
    p.add_argument(
        "--neuron_backend",
        choices=["auto", "generic", "torch", "triton"],
        help="model config key 'neuron_backend' (left out of the config when not given)",
    )
    p.add_argument("--neuron", choices=sorted(NEURONS), help="model config key 'neuron' (default lif)")
    p.add_argument("--reset", choices=["subtract", "zero"], help="model config key 'reset' (default subtract)")
    p.add_argument(
        "--dilated_as_dense",
        choices=["auto", "on", "off"],
        help="model config key 'dilated_as_dense': dilated convolutions as dense ones over their phases "
        "(auto: CUDA in bf16/fp16; left out of the config when not given)",
    )
    p.add_argument(
        "--path",
        default="multistep",
        choices=["multistep", "per-timestep"],
        help="train the multi-step network, or the per-timestep baseline loop",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also time the per-timestep baseline on the same weights, and report the speedups",
    )
    p.add_argument(
        "--cpu_malloc",
        default="auto",
        choices=POLICIES,
        help="C heap policy (utils/allocator.py); auto: release with --memory_saving, else balanced",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--no_floor", action="store_true", help="skip the ANN floor measurement")
    p.add_argument("--no_profile", action="store_true", help="skip counting CUDA kernel launches")
    return p


def parse_args(argv=None):
    """The arguments, with the --shape preset filled in where no flag overrides it."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    try:
        args.img_size = parse_size(args.img_size)
    except ValueError as error:
        parser.error(str(error))
    if args.img_size is None:
        parser.error("--img_size: the benchmark needs a fixed size (S or H W), not the native one")
    if args.baseline and args.path == "per-timestep":
        parser.error("--baseline compares against the multi-step path: leave --path at multistep")
    try:
        problem = compile_problem(resolve_model_config(model_config(args, "snn")))
    except ValueError as error:  # a neuron that cannot be built with these flags
        parser.error(str(error))
    if problem:
        parser.error(f"--compile: {problem}")
    return args


# ------------------------------------------------------------------------------------------ inputs
def make_inputs(args, device):
    """(network input, labels). Images: uniform in [-0.5, 0.5). Events: sparse 2-channel count frames,
    min-max scaled per channel to [-0.5, 0.5] as the DDD17 loader does, for the Poisson encoder."""
    n, (h, w) = args.batch_size, args.img_size
    if args.input == "events":
        from data.transforms import scale_events  # only here: it imports torchvision

        active = torch.rand(n, args.in_channels, h, w) < EVENT_DENSITY
        counts = torch.poisson(torch.full((n, args.in_channels, h, w), EVENTS_PER_PIXEL)) * active
        inputs = scale_events(counts)
    else:
        inputs = torch.rand(n, args.in_channels, h, w) - 0.5
    labels = torch.randint(0, args.num_classes, (n, h, w))
    return inputs.to(device), labels.to(device)


def model_config(args, model_type):
    cfg = dict(
        model_type=model_type,
        arch=args.arch,
        timesteps=args.timesteps,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        encoder=args.encoder,
        full_prop=args.full_prop and model_type == "snn",
        memory_saving=args.memory_saving and model_type == "snn",
        memory_block=args.memory_block,
        compile=args.compile,
    )
    if args.neuron_backend is not None and model_type == "snn":  # only when asked: the key is new
        cfg["neuron_backend"] = args.neuron_backend
    for key in ("neuron", "reset"):  # only when asked, as neuron_backend
        if getattr(args, key) is not None and model_type == "snn":
            cfg[key] = getattr(args, key)
    if args.dilated_as_dense is not None:  # likewise
        cfg["dilated_as_dense"] = args.dilated_as_dense
    return cfg


# ----------------------------------------------------------------------------------------- timing
def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_cuda_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mb(device):
    """The CUDA memory peak since the last reset (None elsewhere)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def make_train_step(model, opt, forward, inputs, labels, args, device):
    """A function running one full SGD step (forward, loss, backward, optimizer) and returning its wall time."""

    def step():
        model.train()
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(forward(inputs), labels, ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        return time.perf_counter() - start

    return step


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def train_alone(step, steps, device):
    """(median step time after a warm-up step, the phase's CUDA peak)."""
    reset_cuda_peak(device)
    step()
    median = statistics.median(step() for _ in range(steps))
    return round(median, 4), cuda_peak_mb(device)


@torch.no_grad()
def eval_throughput(model, forward, inputs, batches, args, device):
    """(images per second without gradients after a warm-up batch, the phase's CUDA peak)."""
    model.eval()
    reset_cuda_peak(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        forward(inputs)
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            forward(inputs)
        sync(device)
    return round(batches * inputs.shape[0] / (time.perf_counter() - start), 2), cuda_peak_mb(device)


# ------------------------------------------------------------------------------- kernel launches
# Host calls that each put work on the GPU: a kernel (runtime or driver API, the latter is how Triton
# launches), or a whole CUDA graph (one call, however many kernels it replays).
LAUNCH_CALLS = frozenset(
    {
        "cudaLaunchKernel",
        "cudaLaunchKernelExC",
        "cudaLaunchCooperativeKernel",
        "cuLaunchKernel",
        "cuLaunchKernelEx",
        "cuLaunchCooperativeKernel",
        "cudaGraphLaunch",
        "cuGraphLaunch",
    }
)


def _api_name(name):
    """'cudaLaunchKernelExC_v11060' -> 'cudaLaunchKernelExC' (CUPTI may name an API call by its version)."""
    return re.sub(r"_v\d+$", "", name)


def _device_kind(event):
    """What ran on the GPU: kineto's activity type ('kernel', 'gpu_memcpy', 'gpu_memset', 'cuda_sync', ...)
    where this torch reports it, else read from the name (copies, fills and syncs are named so)."""
    kind = getattr(event, "activity_type", None)
    if kind:
        return kind
    if event.name.startswith("Memcpy"):
        return "gpu_memcpy"
    if event.name.startswith("Memset"):
        return "gpu_memset"
    if event.name.endswith("Sync") or event.name.startswith("Stream Wait"):
        return "cuda_sync"
    return "kernel"


def count_cuda_work(events):
    """Counts over profiler events (anything with ``name`` and ``device_type``):

    - ``launches``: host calls in ``LAUNCH_CALLS`` (what a launch-bound step pays for on the CPU);
    - ``kernels``: kernels that ran on the GPU (differs from ``launches`` inside CUDA graphs);
    - ``memops``: copies and fills on the GPU (cudaMemcpy/cudaMemset work: not kernels, not launches).
    """
    counts = {"launches": 0, "kernels": 0, "memops": 0}
    for event in events:
        if event.device_type == DeviceType.CUDA:
            kind = _device_kind(event)
            if kind == "kernel":
                counts["kernels"] += 1
            elif kind in ("gpu_memcpy", "gpu_memset"):
                counts["memops"] += 1
        elif _api_name(event.name) in LAUNCH_CALLS:
            counts["launches"] += 1
    return counts


def profile_events(fn, device):
    """The torch.profiler events of one call of ``fn`` (host ops; on CUDA also runtime calls and GPU work)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    return prof.events()


TOP_KERNELS = 15


def top_kernels(events, count=TOP_KERNELS):
    """The ``count`` kernels with the most GPU time in the profile, most first: [{name, calls, device_ms}]
    (kernels of one name summed; copies, fills and syncs are not kernels)."""
    totals = {}
    for event in events:
        if event.device_type == DeviceType.CUDA and _device_kind(event) == "kernel":
            calls, micros = totals.get(event.name, (0, 0.0))
            totals[event.name] = (calls + 1, micros + event.time_range.elapsed_us())
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:count]
    return [{"name": name, "calls": calls, "device_ms": round(micros / 1000, 3)} for name, (calls, micros) in ranked]


def cuda_work_per_step(step, device, enabled, prefix=""):
    """``<prefix>cuda_{launches,kernels,memops}_per_step`` of one more (warm) step and
    ``<prefix>cuda_top_kernels`` (``top_kernels``); None off CUDA."""
    events = profile_events(step, device) if enabled and device.type == "cuda" else None
    counts = count_cuda_work(events) if events is not None else {}
    out = {f"{prefix}cuda_{key}_per_step": counts.get(key) for key in ("launches", "kernels", "memops")}
    out[f"{prefix}cuda_top_kernels"] = top_kernels(events) if events is not None else None
    return out


# ------------------------------------------------------------------------------------------- phases
def per_timestep(model):
    return lambda inputs: per_timestep_forward(model, inputs)


def floor_phase(snn_step, args, inputs, labels, device):
    """The ANN over N*T images, its steps alternating with the SNN's (see the module docstring)."""
    ann = build_model(model_config(args, "ann")).to(device)
    t = args.timesteps
    floor_step = make_train_step(
        ann, sgd(ann), ann, inputs.repeat_interleave(t, 0), labels.repeat_interleave(t, 0), args, device
    )
    reset_cuda_peak(device)
    floor_step()  # warm-up
    pairs = [(snn_step(), floor_step()) for _ in range(args.steps)]
    step_s = round(statistics.median(p[0] for p in pairs), 4)
    bound_s = round(statistics.median(p[1] for p in pairs), 4)
    return {
        "step_s": step_s,
        "bound_step_s": bound_s,
        "step_over_bound": round(step_s / bound_s, 3),
        "floor_peak_rss_mb": round(peak_rss_mb(), 1),
        "floor_peak_cuda_mb": cuda_peak_mb(device),
    }


def baseline_phase(snn, opt, result, args, inputs, labels, device):
    """The per-timestep loop on the SNN's own weights and optimizer (so the same tensors stay resident)."""
    forward = per_timestep(snn)
    step = make_train_step(snn, opt, forward, inputs, labels, args, device)
    step_s, peak = train_alone(step, args.steps, device)
    out = {"baseline_step_s": step_s, "baseline_peak_cuda_mb": peak, "baseline_peak_rss_mb": round(peak_rss_mb(), 1)}
    out["baseline_eval_img_per_s"], out["baseline_eval_peak_cuda_mb"] = eval_throughput(
        snn, forward, inputs, args.eval_batches, args, device
    )
    out["speedup_vs_baseline"] = round(step_s / result["solo_step_s"], 3)
    out["eval_speedup_vs_baseline"] = round(result["eval_img_per_s"] / out["baseline_eval_img_per_s"], 3)
    return out, step


def describe(args, snn):
    """The run's configuration and machine, for the JSON line."""
    keys = (
        "arch",
        "shape",
        "timesteps",
        "batch_size",
        "img_size",
        "in_channels",
        "num_classes",
        "encoder",
        "input",
        "full_prop",
        "memory_saving",
        "memory_block",
        "amp",
        "compile",
        "compile_model",
        "neuron",
        "reset",
        "dilated_as_dense",
        "path",
        "baseline",
        "cpu_malloc",
        "device",
    )
    out = {k: getattr(args, k) for k in keys}
    # The backend that ran the neurons, where the model says; else what was asked for (None: the default).
    out["neuron_backend"] = getattr(snn, "neuron_backend", None) or args.neuron_backend
    out["neuron_backend_requested"] = args.neuron_backend
    out.update(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
    )
    if torch.device(args.device).type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(args.device), cuda=torch.version.cuda)
    return out


def print_table(metrics):
    print(f"{'metric':<32}value")
    for key, value in metrics.items():
        if key.endswith("top_kernels") and value:
            print(f"{key:<32}(device ms, calls, kernel)")
            for kernel in value:
                print(f"{'':<32}{kernel['device_ms']:>9.3f} {kernel['calls']:>5}  {kernel['name'][:100]}")
        elif value is not None:
            print(f"{key:<32}{value}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.cpu_malloc = set_cpu_malloc(args.cpu_malloc, args.memory_saving)  # report the concrete policy
    device = torch.device(args.device)
    torch.manual_seed(0)
    inputs, labels = make_inputs(args, device)
    result = {"import_rss_mb": round(peak_rss_mb(), 1)}
    # Any torch.optim step imports torch._dynamo (and with it sympy and triton) on first use: memory
    # every PyTorch training process holds before its first tensor of real work.
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()
    result["framework_rss_mb"] = round(peak_rss_mb(), 1)

    snn = build_model(model_config(args, "snn")).to(device)
    opt = sgd(snn)
    forward = per_timestep(snn) if args.path == "per-timestep" else snn
    if args.compile_model:
        forward = torch.compile(forward)
    snn_step = make_train_step(snn, opt, forward, inputs, labels, args, device)
    result["solo_step_s"], result["peak_cuda_mb"] = train_alone(snn_step, args.steps, device)
    result["step_s"] = result["solo_step_s"]
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["eval_img_per_s"], result["eval_peak_cuda_mb"] = eval_throughput(
        snn, forward, inputs, args.eval_batches, args, device
    )
    if not args.no_floor:
        result.update(floor_phase(snn_step, args, inputs, labels, device))
    baseline_step = None
    if args.baseline:
        baseline, baseline_step = baseline_phase(snn, opt, result, args, inputs, labels, device)
        result.update(baseline)
    result.update(cuda_work_per_step(snn_step, device, not args.no_profile))
    if baseline_step is not None:
        result.update(cuda_work_per_step(baseline_step, device, not args.no_profile, prefix="baseline_"))
    print_table(result)
    result.update(describe(args, snn))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
