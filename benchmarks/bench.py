"""Speed and memory of SNN training and inference, with the compute floor measured in the same process.

    python benchmarks/bench.py --arch dl-vgg9 --timesteps 10 --batch_size 4 --img_size 64 --steps 3

1. The SNN trains alone: one warm-up step, then ``--steps`` timed ones (``solo_step_s``, their median).
   ``peak_rss_mb`` (the process's peak resident memory, ru_maxrss) is read now, so it is the SNN's;
   ``import_rss_mb`` is what the process held before building anything (``import torch`` and ours), and
   ``framework_rss_mb`` what it held after a first (empty) optimizer step, which imports torch._dynamo.
2. Inference throughput (``eval_img_per_s``, no gradients).
3. The floor: the same convolutions, BN and ReLU as an ANN over a batch of N*T images, i.e. what the
   SNN's convolutions cost at the least. SNN and floor steps then alternate ``--steps`` times and
   ``step_s`` / ``bound_step_s`` are their medians: both see the same machine and the same state of
   the C heap, which moves either by 10-20 % on its own (see utils/allocator.py).
   ``floor_peak_rss_mb`` is the process's peak after this phase (at least the floor's own peak).

``--path per-timestep`` trains the straightforward per-timestep loop of tests/reference_snn.py (every
layer called once per timestep, autograd through time) instead of the multi-step network.
The last printed line is one JSON object.
"""
import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo is not installed

from models import ARCHITECTURES, build_model  # noqa: E402
from models.neurons import time_split  # noqa: E402
from tests.reference_snn import per_timestep_forward  # noqa: E402
from utils.allocator import POLICIES, set_cpu_malloc  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='dl-vgg9', choices=sorted(ARCHITECTURES))
    p.add_argument('--timesteps', type=int, default=10)
    p.add_argument('--batch_size', type=int, default=4)
    p.add_argument('--img_size', type=int, default=64)
    p.add_argument('--num_classes', type=int, default=21)
    p.add_argument('--steps', type=int, default=3, help='timed training steps (after one warm-up step)')
    p.add_argument('--eval_batches', type=int, default=3)
    p.add_argument('--encoder', default='poisson', choices=['poisson', 'direct'])
    p.add_argument('--full_prop', action='store_true')
    p.add_argument('--memory_saving', action='store_true',
                   help='replay blocks of --memory_block timesteps in backward, recomputing each spiking conv')
    p.add_argument('--memory_block', type=int, default=4)
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast (CPU and GPU)')
    p.add_argument('--compile', action='store_true', help="fuse the neurons' elementwise steps with torch.compile")
    p.add_argument('--path', default='multistep', choices=['multistep', 'per-timestep'],
                   help='the multi-step network, or the per-timestep reference loop')
    p.add_argument('--cpu_malloc', default='auto', choices=POLICIES,
                   help='C heap policy (utils/allocator.py); auto: release with --memory_saving, else balanced')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    p.add_argument('--no_floor', action='store_true', help='skip the ANN floor measurement')
    return p


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def make_train_step(model, batch, labels, args, device, forward=None):
    """A function running one full SGD step (forward, loss, backward, optimizer) and returning its wall time."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    forward = forward or model

    def step():
        model.train()
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(forward(batch), labels, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        return time.perf_counter() - start
    return step


@torch.no_grad()
def eval_throughput(model, forward, batch, batches, args, device):
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        forward(batch)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            forward(batch)
        sync(device)
    return batches * batch.shape[0] / (time.perf_counter() - start)


def per_timestep(model):
    """The model's forward as the per-timestep reference loop (encoder output split into [T, N, ...])."""
    def forward(images):
        spikes = model.encoder(images, model.timesteps)
        frames = time_split(spikes, model.timesteps)
        return per_timestep_forward(model, frames)
    return forward


def model_config(args, model_type):
    return dict(model_type=model_type, arch=args.arch, timesteps=args.timesteps, num_classes=args.num_classes,
                encoder=args.encoder, full_prop=args.full_prop and model_type == 'snn',
                memory_saving=args.memory_saving and model_type == 'snn', memory_block=args.memory_block,
                compile=args.compile)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.cpu_malloc = set_cpu_malloc(args.cpu_malloc, args.memory_saving)  # report the concrete policy
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, t, size = args.batch_size, args.timesteps, args.img_size
    images = (torch.rand(n, 3, size, size, device=device) - 0.5)
    labels = torch.randint(0, args.num_classes, (n, size, size), device=device)
    result = {'import_rss_mb': round(peak_rss_mb(), 1)}
    # Any torch.optim step imports torch._dynamo (and with it sympy and triton) on first use: memory
    # every PyTorch training process holds before its first tensor of real work.
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()
    result['framework_rss_mb'] = round(peak_rss_mb(), 1)

    snn = build_model(model_config(args, 'snn')).to(device)
    forward = per_timestep(snn) if args.path == 'per-timestep' else snn
    snn_step = make_train_step(snn, images, labels, args, device, forward)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    snn_step()  # warm-up
    result['solo_step_s'] = round(statistics.median(snn_step() for _ in range(args.steps)), 4)
    result['step_s'] = result['solo_step_s']
    result['peak_rss_mb'] = round(peak_rss_mb(), 1)
    if device.type == 'cuda':
        result['peak_cuda_mb'] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result['eval_img_per_s'] = round(eval_throughput(snn, forward, images, args.eval_batches, args, device), 2)

    if not args.no_floor:
        # The floor: the SNN's convolutions (+ BN + ReLU) once, as an ANN over N*T images.
        ann = build_model(model_config(args, 'ann')).to(device)
        floor_step = make_train_step(ann, images.repeat_interleave(t, 0), labels.repeat_interleave(t, 0),
                                     args, device)
        floor_step()  # warm-up
        pairs = [(snn_step(), floor_step()) for _ in range(args.steps)]
        result['step_s'] = round(statistics.median(p[0] for p in pairs), 4)
        result['bound_step_s'] = round(statistics.median(p[1] for p in pairs), 4)
        result['step_over_bound'] = round(result['step_s'] / result['bound_step_s'], 3)
        result['floor_peak_rss_mb'] = round(peak_rss_mb(), 1)

    config = {k: getattr(args, k) for k in ('arch', 'timesteps', 'batch_size', 'img_size', 'encoder', 'full_prop',
                                            'memory_saving', 'memory_block', 'amp', 'compile', 'path', 'cpu_malloc', 'device')}
    result.update(config, torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=f'{platform.machine()} {platform.processor() or ""}'.strip())
    print(f"{'metric':<18}value")
    for key in ('step_s', 'bound_step_s', 'step_over_bound', 'solo_step_s', 'import_rss_mb', 'framework_rss_mb',
                'peak_rss_mb',
                'floor_peak_rss_mb', 'peak_cuda_mb', 'eval_img_per_s'):
        if key in result:
            print(f'{key:<18}{result[key]}')
    print(json.dumps(result))


if __name__ == '__main__':
    main()
