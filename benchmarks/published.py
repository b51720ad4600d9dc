"""SLTNet and Spike-BRGNet: our port against the authors' own code, on the CPU, same shapes and settings.

    python benchmarks/published.py --repo /path/to/SLTNet --model sltnet
    python benchmarks/published.py --repo /path/to/Spike-BRGNet --model spike-brgnet --train_batch 2 --batch 1

The authors' repository is the user's (this project does not contain their code); their requirements
(SpikingJelly 0.0.0.0.14, timm for SLTNet, yacs for Spike-BRGNet) and ours must import in this Python. Each
measurement runs in a fresh process (``--side ours|theirs``), the two sides alternating, ``--rounds`` times:

- inference: ``--batch`` inputs in eval mode without gradients, the logits upsampled to the input as each
  code evaluates (theirs: SLTNet's two heads; Spike-BRGNet's evaluation form, then a bilinear resize);
- a training step: forward, the published loss (SLTNet: OHEM with the early head; Spike-BRGNet: its
  FullModel's OHEM, detail head and boundary term), backward, Adam; ``--train_batch`` inputs;
- memory: the process's peak resident memory minus its value before the first step, once the model and the
  inputs are built (``*_step_mb``: what the steps themselves need, whatever each side imports), and the
  process's peak (``*_peak_rss_mb``).

The C heap's policy (utils/allocator.py) is held equal on both sides: glibc's own by default, another with
``--cpu_malloc`` (it moves both sides' times by up to 40 %; docs/models.md).

The inputs are the published sizes (DDD17 200x352, DSEC 440x640; SLTNet: 5 bins as channels, Spike-BRGNet: 5
bins as timesteps) and batches (SLTNet 64 / 16, Spike-BRGNet 32 / 12: tens of GB on a CPU; scale them down with
``--batch`` / ``--train_batch``). The last line printed is one JSON object; docs/models.md has the figures.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _allocator():
    """utils/allocator.py loaded by its path: the authors' repositories have a ``utils`` package of their own,
    which importing ours by name would shadow in their side's process."""
    spec = importlib.util.spec_from_file_location("snnseg_allocator", REPO / "utils" / "allocator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ALLOCATOR = _allocator()
SIZES = {"ddd17": (200, 352), "dsec": (440, 640)}
CLASSES = {"ddd17": 6, "dsec": 11}
BATCHES = {("sltnet", "ddd17"): 64, ("sltnet", "dsec"): 16, ("spike-brgnet", "ddd17"): 32, ("spike-brgnet", "dsec"): 12}
ADVERTISED = {"ddd17": (200, 346), "dsec": (440, 640)}  # SLTNet's --input_size, from which its OHEM min_kept follows


def min_kept(args, batch):
    """The OHEM loss's min_kept: Spike-BRGNet's 131072; SLTNet's batch * H * W // 16 of its advertised size."""
    if args.model == "spike-brgnet":
        return 131072
    height, width = ADVERTISED[args.dataset]
    return batch * height * width // 16


def get_args_parser():
    p = argparse.ArgumentParser(description="Time our SLTNet / Spike-BRGNet against the authors' code (CPU).")
    p.add_argument("--repo", required=True, help="the authors' repository (SLTNet's or Spike-BRGNet's)")
    p.add_argument("--model", required=True, choices=("sltnet", "spike-brgnet"))
    p.add_argument("--dataset", default="ddd17", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=None, help="inference batch (default: the published batch)")
    p.add_argument("--train_batch", type=int, default=None, help="training batch (default: the published batch)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    p.add_argument("--rounds", type=int, default=2, help="processes per side, alternating with the other side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per available CPU)")
    p.add_argument("--img_size", type=int, nargs=2, help="H W instead of the published size (multiples of 8)")
    p.add_argument("--modes", default="infer,train", help="infer, train or both")
    p.add_argument(
        "--cpu_malloc",
        choices=ALLOCATOR.POLICIES,
        default="default",
        help="the C-heap policy of both sides (utils/allocator.py; default: glibc's own)",
    )
    p.add_argument("--side", choices=("ours", "theirs"), help=argparse.SUPPRESS)  # a child process
    p.add_argument("--mode", choices=("infer", "train"), help=argparse.SUPPRESS)
    return p


def current_rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def inputs(args, batch, torch):
    """The same seeded voxel-grid-like input and labels on both sides: [N, 5, H, W] and [N, H, W]."""
    height, width = args.img_size or SIZES[args.dataset]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 5, height, width, generator=g)
    x = x * (torch.rand(x.shape, generator=g) < 0.5)
    y = torch.randint(0, CLASSES[args.dataset], (batch, height, width), generator=g)
    return x, y


# ------------------------------------------------------------------------------------------ the two sides
def ours(args, batch, training):
    """(step function) of our architecture, built from the published config."""
    sys.path.insert(0, str(REPO))
    import torch

    import setup
    import train as train_script

    argv = ["--config", str(REPO / "configs" / f"{args.model}-{args.dataset}.yaml"), "--device", "cpu"]
    cfg = setup.resolve_config(train_script.get_args_parser().parse_args(argv))
    x, y = inputs(args, batch, torch)
    if args.model == "spike-brgnet":
        x = x.transpose(0, 1).unsqueeze(2).contiguous()  # the bins as timesteps: [T, N, 1, H, W]
    cfg["ohem_min_kept"] = min_kept(args, batch)
    model = setup.build_model(cfg)
    if not training:
        model.eval()

        def infer():
            with torch.no_grad():
                model(x)

        return infer
    loss, optimizer = setup.build_loss(cfg), setup.build_optimizer(cfg, model)
    model.train()

    def step():
        value = loss(model(x, heads=True), y)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step


def theirs(args, batch, training):
    """(step function) of the authors' model from ``--repo``, built as their scripts build it."""
    import torch
    import torch.nn.functional as F

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(args.repo).resolve()))
    x, y = inputs(args, batch, torch)
    classes = CLASSES[args.dataset]
    if args.model == "sltnet":
        from builders.model_builder import build_model
        from spikingjelly.activation_based import functional
        from utils.losses.loss import ProbOhemCrossEntropy2d

        model = build_model("SLTNet", num_classes=classes, ohem=True, early_loss=True)
        functional.set_step_mode(model, step_mode="m")
        if not training:
            model.eval()

            def infer():
                with torch.no_grad():
                    model(x)  # [main, early], both at the input's size

            return infer
        crit = ProbOhemCrossEntropy2d(
            ignore_label=255, thresh=0.7, min_kept=min_kept(args, batch), balance_weights=[1.0, 0.4]
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        model.train()

        def step():
            loss = crit(model(x), y)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step
    from configs import config

    config.defrost()
    tag = "DDD17" if args.dataset == "ddd17" else "DSEC"
    config.merge_from_file(str(Path(args.repo) / "configs" / tag / f"SpikeBRGNet_{tag}.yaml"))
    config.DATASET.NUM_CLASSES = classes
    config.freeze()
    import models.SpikeBRGNet as network
    from spikingjelly.activation_based import functional
    from utils.criterion import BondaryLoss, OhemCrossEntropy
    from utils.utils import FullModel

    x = x.unsqueeze(2)  # [N, T=5, 1, H, W]
    if not training:
        model = network.get_pred_model(config, name="SpikeBRGNet", num_classes=classes).eval()

        def infer():
            with torch.no_grad():
                F.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=True)

        return infer
    full = FullModel(
        network.get_seg_model(config, imgnet_pretrained=False),
        OhemCrossEntropy(ignore_label=255, thres=0.9, min_kept=min_kept(args, batch)),
        BondaryLoss(),
    )
    optimizer = torch.optim.Adam(full.parameters(), lr=config.TRAIN.LR, weight_decay=1e-4)
    full.train()
    boundary = torch.zeros(y.shape)

    def step():
        losses, _, _, _ = full(x, y, boundary)
        functional.reset_net(full)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()

    return step


def child(args):
    """One side, one mode: a warm-up step, then ``--steps`` timed ones; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ALLOCATOR.set_cpu_malloc(args.cpu_malloc)
    training = args.mode == "train"
    batch = args.train_batch if training else args.batch
    step = (ours if args.side == "ours" else theirs)(args, batch, training)
    before = current_rss_mb()
    step()
    seconds = []
    for _ in range(args.steps):
        began = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "side": args.side,
                "mode": args.mode,
                "step_s": statistics.median(seconds),
                "step_mb": round(peak - before, 1),
                "peak_rss_mb": round(peak, 1),
                "load": os.getloadavg()[0],
            }
        )
    )


def run_child(args, side, mode):
    argv = [sys.executable, __file__, "--repo", args.repo, "--model", args.model, "--dataset", args.dataset]
    argv += ["--batch", str(args.batch), "--train_batch", str(args.train_batch), "--steps", str(args.steps)]
    argv += ["--threads", str(args.threads), "--side", side, "--mode", mode]
    argv += ["--img_size", *map(str, args.img_size)] if args.img_size else []
    argv += ["--cpu_malloc", args.cpu_malloc]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {side} {mode} process failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    repo = Path(args.repo)
    marker = {"sltnet": "model/SLTNet.py", "spike-brgnet": "models/SpikeBRGNet.py"}[args.model]
    if not (repo / marker).is_file():
        raise SystemExit(f"error: {repo} is not the {args.model} repository (no {marker})")
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.batch = args.batch or BATCHES[(args.model, args.dataset)]
    args.train_batch = args.train_batch or BATCHES[(args.model, args.dataset)]
    if args.side:
        return child(args)
    rows = {}
    load_before = os.getloadavg()
    for mode in args.modes.split(","):
        for r in range(args.rounds):
            for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                rows.setdefault((side, mode), []).append(run_child(args, side, mode))
                print(json.dumps(rows[(side, mode)][-1]), flush=True)
    result = {
        "model": args.model,
        "dataset": args.dataset,
        "batch": args.batch,
        "train_batch": args.train_batch,
        "threads": args.threads,
        "cpu_malloc": args.cpu_malloc,
        "cpu": platform.processor() or platform.machine(),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    for (side, mode), runs in rows.items():
        result[f"{side}_{mode}_s"] = round(statistics.median(r["step_s"] for r in runs), 3)
        result[f"{side}_{mode}_step_mb"] = max(r["step_mb"] for r in runs)
        result[f"{side}_{mode}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    for mode in args.modes.split(","):
        if f"ours_{mode}_s" in result and f"theirs_{mode}_s" in result:
            result[f"{mode}_speedup"] = round(result[f"theirs_{mode}_s"] / result[f"ours_{mode}_s"], 2)
            result[f"{mode}_memory_ratio"] = round(
                result[f"ours_{mode}_step_mb"] / max(result[f"theirs_{mode}_step_mb"], 1e-9), 2
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
