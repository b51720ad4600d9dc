"""The paper code's forward pass, re-implemented functionally for the import tests.

Independent of models/: the layer lists are written in the paper's own notation, and every tensor is
read straight from a state dict in the paper's layout (features.<i>.weight, bn_features.<i>.<t>.*, ...).
The SNN runs the way the paper's code does: one timestep at a time through all layers, BN of timestep t,
``spike = (mem / thr - 1 > 0)``, reset by subtraction; the DeepLab output conv integrates without leak and
is divided by T, then bilinearly upsampled (align_corners=True); FCN takes skip scores from the spikes,
upsamples with ConvTranspose2d(k3, s2) + bilinear resize (align_corners=True) to (H // d, W // d), and its
last decoder sum integrates without leak and is NOT divided by T.
"""

import torch
import torch.nn.functional as F

# The paper's cfg lists (facts of its architecture): int = 3x3 conv, 'atrousC' = dilated 3x3 conv
# (dilation 2 in features, 12 in the classifier), 'C-k-p' = k x k conv with padding p, 'avgS' = average
# pooling k3 stride S, 'score' = FCN skip score, 'output' = DeepLab's 1x1 output conv.
PAPER_CFG = {
    "dl-vgg9": ([64, 64, "avg2", 128, 128, "avg2", 256, "atrous256", "atrous256"], ["atrous1024", "output"]),
    "fcn-vgg9": (
        [64, 64, "score", "avg2", 128, 128, "score", "avg2", 256, 256, 256, "score", "avg2"],
        ["1024-3-1", "1024-3-1", "score"],
    ),
}


def paper_ops(arch):
    """The forward as a flat list of ops: (kind, part, index, extra)."""
    ops = []
    for part, tokens in zip(("features", "classifier"), PAPER_CFG[arch]):
        convs = 0
        for token in tokens:
            if isinstance(token, int):
                ops.append(("conv", part, convs, (1, 1)))
            elif token.startswith("atrous"):
                dilation = 2 if part == "features" else 12
                ops.append(("conv", part, convs, (dilation, dilation)))
            elif token.startswith("avg"):
                ops.append(("pool", part, None, int(token[3:])))
                continue
            elif token == "score":
                ops.append(("score", part, convs, None))
                continue
            elif token == "output":
                ops.append(("output", part, convs, None))
                continue
            else:
                _, kernel, padding = (int(v) for v in token.split("-"))
                ops.append(("conv", part, convs, (1, padding)))
            convs += 1
    return ops


def _conv(state, part, index, x, dilation_padding=(1, 0)):
    dilation, padding = dilation_padding
    return F.conv2d(x, state[f"{part}.{index}.weight"], padding=padding, dilation=dilation)


def _score(state, part, count, x):
    prefix = f"scores_{part}.{count}"
    return F.conv2d(x, state[prefix + ".weight"], state[prefix + ".bias"])


def _upsample(state, k, x, size):
    up = F.conv_transpose2d(x, state[f"upsample.{k}.0.weight"], stride=2)
    return F.interpolate(up, size=size, mode="bilinear", align_corners=True)


def _decoder_sizes(height, width, stages):
    """The paper's UpsamplingBilinear2d targets: the divisor starts at 8 and halves every stage."""
    divisor, sizes = 2**stages, []
    for _ in range(stages):
        divisor //= 2
        sizes.append((height // divisor, width // divisor))
    return sizes


def paper_ann_forward(state, arch, x, bn=True, alpha=None):
    height, width = x.shape[-2:]
    out, scores, logits = x, [], None
    for kind, part, index, extra in paper_ops(arch):
        if kind == "conv":
            out = _conv(state, part, index, out, extra)
            if bn:
                out = F.batch_norm(
                    out,
                    state[f"bn_{part}.{index}.running_mean"],
                    state[f"bn_{part}.{index}.running_var"],
                    None,
                    None,
                    False,
                    0.1,
                    1e-4,
                )
            out = F.relu(out) if alpha is None else F.leaky_relu(out, alpha)
        elif kind == "pool":
            out = F.avg_pool2d(out, 3, extra, 1)
        elif kind == "score":
            scores.insert(0, _score(state, part, index, out))
        else:
            logits = _conv(state, part, index, out, (1, 0))
    if scores:
        out = scores[0]
        for k, size in enumerate(_decoder_sizes(height, width, len(scores) - 1)):
            out = _upsample(state, k, out, size) + scores[k + 1]
        return out
    return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)


def _fire(mem, current, leak, threshold):
    mem = leak * mem + current
    spike = (mem / threshold - 1 > 0).to(mem.dtype)
    return spike, mem - spike * threshold


def paper_snn_forward(state, arch, frames, leak=0.99, threshold=1.0, bn=True):
    """Logits for explicit input frames [T, N, C, H, W] (the spikes the Poisson generator produced)."""
    steps, height, width = frames.shape[0], frames.shape[-2], frames.shape[-1]
    ops = paper_ops(arch)
    mems, out_mem = {}, 0.0
    for t in range(steps):
        out, scores = frames[t], []
        for kind, part, index, extra in ops:
            if kind == "conv":
                current = _conv(state, part, index, out, extra)
                if bn:
                    prefix = f"bn_{part}.{index}.{t}."
                    current = F.batch_norm(
                        current,
                        state[prefix + "running_mean"],
                        state[prefix + "running_var"],
                        state[prefix + "weight"],
                        None,
                        False,
                        0.1,
                        1e-4,
                    )
                out, mems[(part, index)] = _fire(mems.get((part, index), 0.0), current, leak, threshold)
            elif kind == "pool":
                out = F.avg_pool2d(out, 3, extra, 1)
            elif kind == "score":
                scores.insert(0, _score(state, part, index, out))
            else:
                out_mem = out_mem + _conv(state, part, index, out, (1, 0))  # no leak, no spikes
        if scores:
            out = scores[0]
            sizes = _decoder_sizes(height, width, len(scores) - 1)
            for k, size in enumerate(sizes[:-1]):
                current = _upsample(state, k, out, size) + scores[k + 1]
                out, mems[("up", k)] = _fire(mems.get(("up", k), 0.0), current, leak, threshold)
            last = len(sizes) - 1
            out_mem = out_mem + _upsample(state, last, out, sizes[-1]) + scores[-1]
    if any(op[0] == "score" for op in ops):
        return out_mem  # the paper's FCN readout: the membrane itself
    return F.interpolate(out_mem / steps, size=(height, width), mode="bilinear", align_corners=True)


def random_paper_state(
    arch, model_type, in_channels, num_classes, timesteps=None, bn=True, seed=0, dtype=torch.float64
):
    """A paper-layout state dict of random tensors, built from the key pattern alone."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, low=None):
        values = torch.rand(shape, generator=gen, dtype=dtype)
        return values * scale + low if low is not None else (values * 2 - 1) * scale

    state, channels = {}, in_channels
    for kind, part, index, extra in paper_ops(arch):
        if kind == "conv":
            out_channels = _conv_channels(arch, part, index)
            kernel = 1 if _is_1x1(arch, part, index) else 3
            fan_in = channels * kernel * kernel
            state[f"{part}.{index}.weight"] = rand(out_channels, channels, kernel, kernel, scale=(6 / fan_in) ** 0.5)
            if bn:
                steps = (
                    [f"bn_{part}.{index}.{t}." for t in range(timesteps)]
                    if model_type == "snn"
                    else [f"bn_{part}.{index}."]
                )
                for prefix in steps:
                    if model_type == "snn":
                        state[prefix + "weight"] = rand(out_channels, scale=1.0, low=0.5)
                    state[prefix + "running_mean"] = rand(
                        out_channels, scale=0.6, low=-0.6
                    )  # shifts currents up: spikes everywhere
                    state[prefix + "running_var"] = rand(out_channels, scale=1.5, low=0.5)
                    state[prefix + "num_batches_tracked"] = torch.tensor(int(torch.randint(1, 99, (1,), generator=gen)))
            channels = out_channels
        elif kind == "score":
            state[f"scores_{part}.{index}.weight"] = rand(num_classes, channels, 1, 1, scale=0.5)
            state[f"scores_{part}.{index}.bias"] = rand(num_classes, scale=0.5)
        elif kind == "output":
            state[f"{part}.{index}.weight"] = rand(num_classes, channels, 1, 1, scale=0.5)
    stages = sum(op[0] == "score" for op in paper_ops(arch)) - 1
    for k in range(max(stages, 0)):
        state[f"upsample.{k}.0.weight"] = rand(num_classes, num_classes, 3, 3, scale=0.5)
    return state


def _conv_tokens(arch, part):
    return [
        t
        for t in PAPER_CFG[arch][part == "classifier"]
        if isinstance(t, int) or (t.startswith("atrous") or t[0].isdigit())
    ]


def _conv_channels(arch, part, index):
    token = _conv_tokens(arch, part)[index]
    return token if isinstance(token, int) else int(token.replace("atrous", "").split("-")[0])


def _is_1x1(arch, part, index):
    token = _conv_tokens(arch, part)[index]
    return isinstance(token, str) and "-" in token and token.split("-")[1] == "1"
