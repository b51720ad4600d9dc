"""Speed and memory of SNN training and inference, with the compute floor measured in the same process.

    python benchmarks/bench.py --arch dl-vgg9 --timesteps 10 --batch_size 4 --img_size 64 --steps 3

Order matters for the memory figure: the SNN training steps run first, so ``peak_rss_mb`` (the peak
resident memory of the process, ru_maxrss) is the SNN's; the floor (the same convolutions, BN and ReLU
as an ANN over a batch of N*T images, i.e. what the SNN's convolutions cost at the least) runs after.
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
    p.add_argument('--memory_saving', action='store_true', help='activation checkpointing per layer')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast (CPU and GPU)')
    p.add_argument('--compile', action='store_true', help="fuse the neurons' elementwise steps with torch.compile")
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    p.add_argument('--no_floor', action='store_true', help='skip the ANN floor measurement')
    return p


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_train_steps(model, batch, labels, steps, args, device):
    """Median wall time of full SGD steps (forward, loss, backward, optimizer) after one warm-up step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    model.train()
    times = []
    for i in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(batch), labels, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def eval_throughput(model, batch, batches, args, device):
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        model(batch)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            model(batch)
        sync(device)
    return batches * batch.shape[0] / (time.perf_counter() - start)


def model_config(args, model_type):
    return dict(model_type=model_type, arch=args.arch, timesteps=args.timesteps, num_classes=args.num_classes,
                encoder=args.encoder, full_prop=args.full_prop and model_type == 'snn',
                memory_saving=args.memory_saving and model_type == 'snn', compile=args.compile)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, t, size = args.batch_size, args.timesteps, args.img_size
    images = (torch.rand(n, 3, size, size, device=device) - 0.5)
    labels = torch.randint(0, args.num_classes, (n, size, size), device=device)

    snn = build_model(model_config(args, 'snn')).to(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    step_s = time_train_steps(snn, images, labels, args.steps, args, device)
    result = {'step_s': round(step_s, 4), 'peak_rss_mb': round(peak_rss_mb(), 1)}
    if device.type == 'cuda':
        result['peak_cuda_mb'] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result['eval_img_per_s'] = round(eval_throughput(snn, images, args.eval_batches, args, device), 2)
    del snn

    if not args.no_floor:
        # The floor: the SNN's convolutions (+ BN + ReLU) once, as an ANN over N*T images.
        ann = build_model(model_config(args, 'ann')).to(device)
        big = images.repeat_interleave(t, 0)
        big_labels = labels.repeat_interleave(t, 0)
        result['bound_step_s'] = round(time_train_steps(ann, big, big_labels, args.steps, args, device), 4)
        result['step_over_bound'] = round(step_s / result['bound_step_s'], 3)

    config = {k: getattr(args, k) for k in ('arch', 'timesteps', 'batch_size', 'img_size', 'encoder', 'full_prop',
                                            'memory_saving', 'amp', 'compile', 'device')}
    result.update(config, torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=f'{platform.machine()} {platform.processor() or ""}'.strip())
    print(f"{'metric':<18}value")
    for key in ('step_s', 'bound_step_s', 'step_over_bound', 'peak_rss_mb', 'peak_cuda_mb', 'eval_img_per_s'):
        if key in result:
            print(f'{key:<18}{result[key]}')
    print(json.dumps(result))


if __name__ == '__main__':
    main()
