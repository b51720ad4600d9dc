"""The per-timestep baseline: a SegmentationNet's own parameters, run the way the paper's code runs them.

Every layer is called once per timestep (T small convolutions where the network makes one large one),
BN is one call per timestep (BNTT) and the LIF neurons are plain tensor ops recorded by autograd, so
backward walks T copies of the graph (backpropagation through time). Plain PyTorch layers throughout
(``F.conv2d``, ``F.avg_pool2d``), not the project's memory-saving ones: this is what the multi-step
network is measured against. Sharing the model's parameters and buffers makes the two the same
function, so bench.py times both on the same weights and tests/test_bench.py checks they agree.
"""

import torch
import torch.nn.functional as F

from models.network import ConvUnit, SkipScore


class _Heaviside(torch.autograd.Function):
    """The spike H(x), with the neuron's surrogate g(x) as its derivative."""

    @staticmethod
    def forward(ctx, x, surrogate):
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate.grad(x), None


def lif_step(neuron, mem, current):
    """One timestep of the LIF layer ``neuron`` (a models.neurons.LIF): (spikes, new membrane)."""
    theta = neuron.threshold
    mem = neuron.leak * mem + current
    x = mem / theta - 1
    spikes = _Heaviside.apply(x, neuron.surrogate)
    reset = (x > 0).to(mem.dtype) * theta  # built from a comparison: no gradient through the reset
    if neuron.alpha is not None:  # imbalanced threshold: -1 spikes below theta_neg = -theta / alpha
        theta_neg = -theta / neuron.alpha
        x_neg = mem / theta_neg - 1
        spikes = spikes - _Heaviside.apply(x_neg, neuron.surrogate)
        reset = reset + (x_neg > 0).to(mem.dtype) * theta_neg
    return spikes, mem - reset


def _conv(conv, h):
    return F.conv2d(h, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _bn(norm, h, t, training):
    """BN of timestep t: the t-th of T BatchNorm2d layers (its running statistics update in place)."""
    weight = None if norm.weight is None else norm.weight[t]
    return F.batch_norm(h, norm.running_mean[t], norm.running_var[t], weight, None, training, 0.1, 1e-4)


def _backbone_step(model, h, t, mems):
    """One timestep through the body: the last activation and the skip scores (FCN)."""
    skips = []
    for i, layer in enumerate(model.body):
        if isinstance(layer, ConvUnit):
            current = _conv(layer.conv, h)
            if layer.norm is not None and t < model.timesteps:  # full propagation's tail: no BN
                current = _bn(layer.norm, current, t, model.training)
            h, mems[i] = lif_step(layer.act, mems.get(i, 0.0), current)
        elif isinstance(layer, SkipScore):
            skips.append(layer(h))
        else:  # pooling
            h = F.avg_pool2d(
                h,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.ceil_mode,
                layer.count_include_pad,
                layer.divisor_override,
            )
    return h, skips


def _decoder_step(model, skips, mems):
    """FCN: upsample and add the skip scores, coarsest first; spiking stages fire."""
    h = skips[-1]
    for k, (stage, skip) in enumerate(zip(model.decoder, reversed(skips[:-1]))):
        h = F.interpolate(stage.up(h), size=skip.shape[-2:], mode="bilinear", align_corners=True) + skip
        if stage.act is not None:
            h, mems["decoder", k] = lif_step(stage.act, mems.get(("decoder", k), 0.0), h)
    return h


def per_timestep_forward(model, images):
    """Logits of the spiking SegmentationNet ``model`` for ``images``, one timestep at a time."""
    T = model.timesteps
    encoded = model.encoder(images, T)  # [T*N, C, H, W], time-major
    frames = encoded.view(T, -1, *encoded.shape[1:])
    mems, readout = {}, 0.0
    for t in range(T + model.extra_steps):
        h = frames[t] if t < T else torch.zeros_like(frames[0])
        h, skips = _backbone_step(model, h, t, mems)
        readout = readout + (_decoder_step(model, skips, mems) if model.fcn else model.output(h))
    out = readout if model.readout_sum else readout / T
    return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=True)
