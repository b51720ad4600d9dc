"""SpikingJelly as a peer: dl-vgg9 and fcn-vgg9 written with its modules, and SpikingJelly's own SEW-ResNet-18
(``spikingjelly.activation_based.model.sew_resnet``) as dl-sew-resnet18 and fcn-sew-resnet18, timed against ours
in one process.

    python benchmarks/peer_spikingjelly.py --timesteps 10 --batch_size 4 --img_size 64 --steps 3
    python benchmarks/peer_spikingjelly.py --device cuda --timesteps 20 --batch_size 16 --sj_backend triton

Needs ``pip install spikingjelly==2.0.0 loguru`` (``--no-deps`` keeps the installed torch; loguru is the one
of its dependencies that the modules used here import and this project does not otherwise install).
tests/test_spikingjelly_peer.py checks that these networks and ours compute the same logits, BN
statistics and gradients (float64) from the same weights and Poisson draws.

The networks, from SpikingJelly (2.0) pieces, all in multi-step mode (``step_mode='m'``, tensors
``[T, N, C, H, W]``): ``layer.Conv2d``, ``layer.BatchNormThroughTime2d`` (BNTT: one BatchNorm2d per
timestep, no shift), ``neuron.LIFNode`` and ``layer.AvgPool2d`` / ``layer.ConvTranspose2d``. The LIF node
with ``decay_input=False`` charges ``H = V - (V - V_reset) / tau + X``; with ``v_reset=None`` (reset by
subtraction) ``V_reset`` counts as 0, so ``H = (1 - 1/tau) V + X``: the leak 0.99 is ``tau = 100``. It fires
when ``H - threshold >= 0`` and subtracts the threshold; ``detach_reset=True`` keeps the reset out of the
gradient, as the paper's code (and ours) do. ``surrogate.PiecewiseQuadratic(alpha=1)`` has the derivative
``max(0, 1 - |H - 1|)``: our ``linear`` surrogate with ``gamma = 1`` at threshold 1, and one of the
surrogates SpikingJelly's fused LIF kernels implement (float32, CPU and CUDA).

The SEW-ResNet peers are SpikingJelly's ``sew_resnet18(cnf='ADD')``, built with its ``BasicBlock``, the LIF node
above and BNTT as its ``norm_layer``, switched to multi-step mode. Its ``BasicBlock`` refuses dilation, so for
dl-sew-resnet18 the strides and dilations of stages 3 and 4 are set on its own convolutions, as
torchvision's ``replace_stride_with_dilation`` would (the first block of a stage keeps the previous
dilation); the DeepLab head (a dilated conv unit and the 1x1 readout on the time-mean) and the FCN skip
scores and decoder are the SpikingJelly pieces of the VGG peers above.

Timing (the last printed line is one JSON object): the same weights in both networks; one warm-up step
each, then ``--steps`` training steps (forward with Poisson coding, cross-entropy, backward, SGD)
alternating between ours and the peer (``ours_step_s``, ``peer_step_s``: medians), inference images per
second without gradients (``--eval_batches``), and each network's peak memory in a training step: on
CUDA ``torch.cuda.max_memory_allocated`` after a reset, on the CPU the process's resident memory sampled
every millisecond during the step, minus its value at the step's start (``*_step_rss_mb``).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo is not installed

from benchmarks.bench import eval_throughput, make_train_step, sync  # noqa: E402  (the same timing as bench.py)
from models import build_model  # noqa: E402
from models.parts import SkipScore  # noqa: E402

try:
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
except ImportError as error:  # a one-line message naming the packages
    raise SystemExit(
        f"benchmarks/peer_spikingjelly.py needs SpikingJelly ({error}): pip install --no-deps spikingjelly==2.0.0 "
        "loguru"
    ) from None

LEAK, THRESHOLD, BN_EPS = 0.99, 1.0, 1e-4
# The settings our model must be built with to be this network (models.build_model's config keys).
OUR_CONFIG = dict(leak_mem=LEAK, def_threshold=THRESHOLD, surrogate="linear", surrogate_params={"gamma": 1.0})


def lif(surrogate_function=None):
    return neuron.LIFNode(
        tau=100.0,  # 1 - 1/tau = 0.99 = LEAK
        decay_input=False,
        v_threshold=THRESHOLD,
        v_reset=None,
        surrogate_function=surrogate_function or surrogate.PiecewiseQuadratic(alpha=1.0),
        detach_reset=True,
        step_mode="m",
    )


class Unit(nn.Sequential):
    """conv (no bias) -> BNTT -> LIF."""

    def __init__(self, cin, cout, timesteps, dilation=1, kernel=3, surrogate_function=None):
        super().__init__(
            layer.Conv2d(
                cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=False, step_mode="m"
            ),
            layer.BatchNormThroughTime2d(timesteps, cout, eps=BN_EPS, momentum=0.1, step_mode="m"),
            lif(surrogate_function),
        )


def pool():
    return layer.AvgPool2d(3, stride=2, padding=1, step_mode="m")


class DeepLabVGG9(nn.Module):
    """conv64 x2, pool, conv128 x2, pool, conv256, conv256 (dilation 2) x2, conv1024 (dilation 12), then a
    1x1 output convolution of the last spikes averaged over time, bilinearly resized to the input."""

    def __init__(self, in_channels, classes, timesteps, surrogate_function=None):
        super().__init__()
        u = lambda cin, cout, d=1: Unit(cin, cout, timesteps, d, surrogate_function=surrogate_function)  # noqa: E731
        self.timesteps = timesteps
        self.body = nn.Sequential(
            u(in_channels, 64), u(64, 64), pool(),
            u(64, 128), u(128, 128), pool(),
            u(128, 256), u(256, 256, 2), u(256, 256, 2),
            u(256, 1024, 12),
        )  # fmt: skip
        self.output = nn.Conv2d(1024, classes, 1, bias=False)

    def forward(self, x_seq, size):
        functional.reset_net(self)
        rate = self.body(x_seq).sum(0) / self.timesteps
        return F.interpolate(self.output(rate), size=size, mode="bilinear", align_corners=True)


class FCNVGG9(nn.Module):
    """conv64 x2 [score], pool, conv128 x2 [score], pool, conv256 x3 [score], pool, conv1024 x2 [score];
    the decoder from the coarsest score up: transposed conv (k3, s2), bilinear resize to the next score,
    add it, LIF (not after the last addition); the output is that sum over time / T, resized to the input."""

    def __init__(self, in_channels, classes, timesteps, surrogate_function=None):
        super().__init__()
        u = lambda cin, cout: Unit(cin, cout, timesteps, surrogate_function=surrogate_function)  # noqa: E731
        score = lambda cin: layer.Conv2d(cin, classes, 1, step_mode="m")  # noqa: E731
        self.timesteps = timesteps
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(u(in_channels, 64), u(64, 64)),
                nn.Sequential(pool(), u(64, 128), u(128, 128)),
                nn.Sequential(pool(), u(128, 256), u(256, 256), u(256, 256)),
                nn.Sequential(pool(), u(256, 1024), u(1024, 1024)),
            ]
        )
        self.scores = nn.ModuleList([score(64), score(128), score(256), score(1024)])
        self.ups = nn.ModuleList(
            [layer.ConvTranspose2d(classes, classes, 3, stride=2, bias=False, step_mode="m") for _ in range(3)]
        )
        self.lifs = nn.ModuleList([lif(surrogate_function), lif(surrogate_function)])

    def forward(self, x_seq, size):
        functional.reset_net(self)
        h, scores = x_seq, []
        for block, score in zip(self.blocks, self.scores):
            h = block(h)
            scores.append(score(h))
        return fcn_decode(scores, self.ups, self.lifs, self.timesteps, size)


def fcn_decode(scores, ups, lifs, timesteps, size):
    """The FCN decoder on score maps ``[T, N, K, h, w]``, coarsest last: upsample, resize, add, fire."""
    h = scores[-1]
    for k, (up, skip) in enumerate(zip(ups, reversed(scores[:-1]))):
        y = up(h)
        t, n = y.shape[:2]
        y = F.interpolate(y.flatten(0, 1), size=skip.shape[-2:], mode="bilinear", align_corners=True)
        h = y.view(t, n, *y.shape[1:]) + skip
        if k < len(lifs):
            h = lifs[k](h)
    return F.interpolate(h.sum(0) / timesteps, size=size, mode="bilinear", align_corners=True)


class SEWResNet18(nn.Module):
    """SpikingJelly's sew_resnet18 (ADD) backbone without its classifier, with a DeepLab or an FCN head."""

    def __init__(self, in_channels, classes, timesteps, surrogate_function=None, fcn=False):
        super().__init__()
        from spikingjelly.activation_based.model import sew_resnet

        surrogate_function = surrogate_function or surrogate.PiecewiseQuadratic(alpha=1.0)
        net = sew_resnet.sew_resnet18(
            cnf="ADD",
            spiking_neuron=neuron.LIFNode,
            norm_layer=lambda c: layer.BatchNormThroughTime2d(timesteps, c, eps=BN_EPS, momentum=0.1),
            tau=100.0,
            decay_input=False,
            v_threshold=THRESHOLD,
            v_reset=None,
            surrogate_function=surrogate_function,
            detach_reset=True,
        )
        net.conv1 = layer.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        if not fcn:  # stages 3 and 4 dilated (2, then 4) instead of strided
            for stage, previous, dilation in ((net.layer3, 1, 2), (net.layer4, 2, 4)):
                for index, block in enumerate(stage):
                    d = previous if index == 0 else dilation
                    for conv in (block.conv1, block.conv2):
                        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
                    if block.downsample is not None:
                        block.downsample[0].stride = (1, 1)
        del net.avgpool, net.fc
        self.net, self.fcn, self.timesteps = net, fcn, timesteps
        if fcn:
            self.scores = nn.ModuleList(layer.Conv2d(c, classes, 1) for c in (64, 64, 128, 256, 512))
            self.ups = nn.ModuleList(layer.ConvTranspose2d(classes, classes, 3, stride=2, bias=False) for _ in range(4))
            self.lifs = nn.ModuleList([lif(surrogate_function) for _ in range(3)])
        else:
            self.classifier = Unit(512, 256, timesteps, 12, surrogate_function=surrogate_function)
            self.output = nn.Conv2d(256, classes, 1, bias=False)
        functional.set_step_mode(self, "m")

    def forward(self, x_seq, size):
        functional.reset_net(self)
        net = self.net
        stem = net.sn1(net.bn1(net.conv1(x_seq)))
        features = [stem, net.layer1(net.maxpool(stem))]
        for stage in (net.layer2, net.layer3, net.layer4):
            features.append(stage(features[-1]))
        if self.fcn:
            scores = [score(f) for score, f in zip(self.scores, features)]
            return fcn_decode(scores, self.ups, self.lifs, self.timesteps, size)
        rate = self.classifier(features[-1]).sum(0) / self.timesteps
        return F.interpolate(self.output(rate), size=size, mode="bilinear", align_corners=True)

    def units(self):
        """(conv, BNTT) of each conv unit, in the order of our model's conv units."""
        net, found = self.net, [(self.net.conv1, self.net.bn1)]
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in stage:
                found += [(block.conv1, block.bn1), (block.conv2, block.bn2)]
                if block.downsample is not None:
                    found.append((block.downsample[0], block.downsample[1]))
        if not self.fcn:
            found.append((self.classifier[0], self.classifier[1]))
        return found


PEERS = {
    "dl-vgg9": DeepLabVGG9,
    "fcn-vgg9": FCNVGG9,
    "dl-sew-resnet18": SEWResNet18,
    "fcn-sew-resnet18": lambda *args, **kw: SEWResNet18(*args, fcn=True, **kw),
}


def peer_units(peer):
    """(conv, BNTT) of the peer's conv units in the order of ours."""
    if isinstance(peer, SEWResNet18):
        return peer.units()
    return [(m[0], m[1]) for m in peer.modules() if isinstance(m, Unit)]


def _heads(ours, peer):
    """(our module, peer module) of the convolutions outside the conv units: readout, scores, decoder."""
    if not getattr(peer, "fcn", isinstance(peer, FCNVGG9)):
        return [(ours.readout_head(), peer.output)]
    scores = [m for m in ours.modules() if isinstance(m, SkipScore)]
    return list(zip(scores, peer.scores)) + [(stage.up, up) for stage, up in zip(ours.decoder, peer.ups)]


def copy_weights(ours, peer):
    """Our model's parameters and BN statistics into the peer (the layers in order of appearance)."""
    our_units, their_units = ours.conv_units(), peer_units(peer)
    assert len(our_units) == len(their_units), (len(our_units), len(their_units))
    with torch.no_grad():
        for a, (conv, bntt) in zip(our_units, their_units):
            conv.weight.copy_(a.conv.weight)
            for t, bn in enumerate(bntt.bn_list):
                bn.weight.copy_(a.norm.weight[t])
                if bn.bias is not None:  # BNTT has no shift
                    bn.bias.zero_()
                    bn.bias.requires_grad_(False)
                bn.running_mean.copy_(a.norm.running_mean[t])
                bn.running_var.copy_(a.norm.running_var[t])
        for a, b in _heads(ours, peer):
            b.weight.copy_(a.weight)
            if a.bias is not None:
                b.bias.copy_(a.bias)


def matching_parameters(ours, peer):
    """(our parameter, peer parameter) pairs: conv weights, BNTT scales (ours [T, C], the peer's T BNs)."""
    pairs = []
    for a, (conv, bntt) in zip(ours.conv_units(), peer_units(peer)):
        pairs.append((a.conv.weight, conv.weight))
        pairs.append((a.norm.weight, [bn.weight for bn in bntt.bn_list]))
    for a, b in _heads(ours, peer):
        pairs.append((a.weight, b.weight))
        if a.bias is not None:
            pairs.append((a.bias, b.bias))
    return pairs


# ------------------------------------------------------------------------------------------- timing
def get_args_parser():
    p = argparse.ArgumentParser(description="SpikingJelly's networks against ours, in one process")
    p.add_argument("--arch", default="dl-vgg9", choices=sorted(PEERS))
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--num_classes", type=int, default=21)
    p.add_argument("--steps", type=int, default=3, help="timed training steps of each network (after a warm-up)")
    p.add_argument("--eval_batches", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument(
        "--sj_backend",
        default="auto",
        choices=["auto", "cuda", "triton", "torch"],
        help="SpikingJelly's LIF implementation on CUDA (its SJ_LIF_CUDA_IMPLEMENTATION; auto: cuda, triton, "
        "torch, the first available)",
    )
    return p


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def poisson(x, timesteps):
    """Signed rate coding, [T, N, C, H, W] (what our encoder computes inside our model)."""
    fire = torch.rand((timesteps, *x.shape), device=x.device, dtype=x.dtype) <= x.abs()
    return fire * torch.sign(x)


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def step_peak_mb(step, device):
    """Peak memory of one call of ``step``: CUDA allocator peak, or on the CPU the sampled resident memory
    above its value at the start."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    start, peak, done = current_rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    return round(max(peak[0], current_rss_mb()) - start, 1)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = args.sj_backend  # read when SpikingJelly first selects (CUDA)
    if args.threads:
        torch.set_num_threads(args.threads)

    device, t = torch.device(args.device), args.timesteps
    torch.manual_seed(0)
    cfg = dict(arch=args.arch, timesteps=t, num_classes=args.num_classes, encoder="poisson", **OUR_CONFIG)
    ours = build_model(cfg).to(device)
    peer = PEERS[args.arch](3, args.num_classes, t).to(device)
    copy_weights(ours.cpu(), peer.cpu())
    ours, peer = ours.to(device), peer.to(device)
    inputs = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device) - 0.5
    labels = torch.randint(0, args.num_classes, (args.batch_size, args.img_size, args.img_size), device=device)
    size = inputs.shape[-2:]
    forwards = {"ours": ours, "peer": lambda x: peer(poisson(x, t), size)}
    fp32 = SimpleNamespace(amp=False)
    steps = {
        name: make_train_step(model, sgd(model), forwards[name], inputs, labels, fp32, device)
        for name, model in (("ours", ours), ("peer", peer))
    }
    result = {}
    for name in ("ours", "peer"):  # warm-up (first calls, kernel compilation), and the memory of a step
        steps[name]()
        key = "cuda_mb" if device.type == "cuda" else "rss_mb"
        result[f"{name}_step_{key}"] = step_peak_mb(steps[name], device)
    times = {"ours": [], "peer": []}
    for _ in range(args.steps):
        for name in ("ours", "peer"):
            times[name].append(steps[name]())
    for name in ("ours", "peer"):
        result[f"{name}_step_s"] = round(statistics.median(times[name]), 4)
    result["peer_over_ours_step"] = round(result["peer_step_s"] / result["ours_step_s"], 3)
    for name, model in (("ours", ours), ("peer", peer)):
        result[f"{name}_eval_img_per_s"] = eval_throughput(
            model, forwards[name], inputs, args.eval_batches, fp32, device
        )[0]
    import spikingjelly

    result.update(
        arch=args.arch,
        timesteps=t,
        batch_size=args.batch_size,
        img_size=args.img_size,
        device=args.device,
        our_neuron_backend=ours.neuron_backend,
        sj_backend=args.sj_backend,
        spikingjelly=getattr(spikingjelly, "__version__", None) or _version("spikingjelly"),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
    )
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for key, value in result.items():
        print(f"{key:<28}{value}")
    print(json.dumps(result))
    return result


def _version(package):
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
