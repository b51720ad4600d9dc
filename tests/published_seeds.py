"""Reproducible float64 weights and inputs for the published networks' reference figures
(tests/reference/published/): everything drawn from one CPU torch.Generator per call, in the order given,
so that the state dict is rebuilt entry by entry in the authors' key order from the stored spec.

    seeded_state(spec, seed, conv_gain): for each (key, shape) in order: integer buffers (num_batches_tracked)
        zeros (no draw); running_mean N(0, 0.1^2); running_var U(0.5, 2.0); a weight of >= 2 dims
        N(0, (conv_gain / sqrt(fan_in))^2); a 1-dim weight U(0.5, 1.5); a bias N(0, 0.1^2); else N(0, 1).
    seeded_input(shape, seed): randn * (rand < 0.5), a sparse, zero-mean voxel-grid-like tensor.
    seeded_labels(shape, classes, seed): randint(0, classes), then 5 % set to 255 (ignored).
    seeded_mask(shape, seed): (rand < 0.5) as float64.
"""

import math

import torch

F64 = torch.float64


def _generator(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def seeded_state(spec, seed, conv_gain=1.0) -> dict:
    g, state = _generator(seed), {}
    for key, shape in spec:
        shape = tuple(int(s) for s in shape)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(shape, generator=g, dtype=F64)
        elif key.endswith("running_var"):
            state[key] = 0.5 + 1.5 * torch.rand(shape, generator=g, dtype=F64)
        elif key.endswith("weight") and len(shape) >= 2:
            state[key] = (conv_gain / math.sqrt(math.prod(shape[1:]))) * torch.randn(shape, generator=g, dtype=F64)
        elif key.endswith("weight"):
            state[key] = 0.5 + torch.rand(shape, generator=g, dtype=F64)
        elif key.endswith("bias"):
            state[key] = 0.1 * torch.randn(shape, generator=g, dtype=F64)
        else:
            state[key] = torch.randn(shape, generator=g, dtype=F64)
    return state


def seeded_input(shape, seed):
    g = _generator(seed)
    values = torch.randn(tuple(shape), generator=g, dtype=F64)
    return values * (torch.rand(tuple(shape), generator=g, dtype=F64) < 0.5).to(F64)


def seeded_labels(shape, classes, seed, ignore_frac=0.05, ignore_index=255):
    g = _generator(seed)
    labels = torch.randint(0, int(classes), tuple(shape), generator=g, dtype=torch.int64)
    labels[torch.rand(tuple(shape), generator=g, dtype=F64) < ignore_frac] = ignore_index
    return labels


def seeded_mask(shape, seed):
    return (torch.rand(tuple(shape), generator=_generator(seed), dtype=F64) < 0.5).to(F64)
