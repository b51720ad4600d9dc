"""Straightforward per-timestep references, written independently of models/ for the tests.

``heaviside_surrogate`` is the spike as an autograd function (the way the paper's code builds it) and
``per_timestep_forward`` runs a SegmentationNet's parameters timestep by timestep, layer by layer, with
plain autograd through time: the slow, obviously-correct twin of the multi-step implementation.
"""

import torch
import torch.nn.functional as F

from models.parts import ConvUnit, SkipScore


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad_fn):
        ctx.save_for_backward(x)
        ctx.grad_fn = grad_fn
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * ctx.grad_fn(x), None


def heaviside_surrogate(x, grad_fn):
    return _Spike.apply(x, grad_fn)


def linear_grad(x, gamma=0.3):
    return gamma * torch.clamp(1 - x.abs(), min=0)


def lif_step(mem, current, leak, theta, grad_fn, theta_neg=None):
    """One LIF update; returns (spike, new membrane). The reset is built from comparisons (no grad)."""
    mem = leak * mem + current
    x = mem / theta - 1
    spike = heaviside_surrogate(x, grad_fn)
    reset = (x > 0).to(mem.dtype) * theta
    if theta_neg is not None:
        x_neg = mem / theta_neg - 1
        spike = spike - heaviside_surrogate(x_neg, grad_fn)
        reset = reset + (x_neg > 0).to(mem.dtype) * theta_neg
    return spike, mem - reset


def _bn_step(norm, x, t, training):
    """BN of timestep t (the t-th of T separate BatchNorm2d layers); stats buffers are cloned."""
    weight = None if norm.weight is None else norm.weight[t]
    return F.batch_norm(x, norm.running_mean[t].clone(), norm.running_var[t].clone(), weight, None, training, 0.1, 1e-4)


def per_timestep_forward(model, frames, grad_fn=linear_grad):
    """Logits of an SNN ``model`` for explicit input frames ``[T, N, C, H, W]``, one step at a time."""
    T = model.timesteps
    total = T + model.extra_steps
    mems, out_mem = {}, 0
    for t in range(total):
        h = frames[t] if t < T else torch.zeros_like(frames[0])
        skips = []
        for i, layer in enumerate(model.body):
            if isinstance(layer, ConvUnit):
                current = layer.conv(h)
                if layer.norm is not None and t < T:
                    current = _bn_step(layer.norm, current, t, model.training)
                h, mems[i] = lif_step(mems.get(i, 0), current, layer.act.leak, layer.act.threshold, grad_fn)
            elif isinstance(layer, SkipScore):
                skips.append(layer(h))
            else:
                h = layer(h)
        if model.fcn:
            h = skips[-1]
            for k, (stage, skip) in enumerate(zip(model.decoder, reversed(skips[:-1]))):
                current = F.interpolate(stage.up(h), size=skip.shape[-2:], mode="bilinear", align_corners=True) + skip
                if stage.act is None:
                    h = current
                else:
                    h, mems[("dec", k)] = lif_step(
                        mems.get(("dec", k), 0), current, stage.act.leak, stage.act.threshold, grad_fn
                    )
            out_mem = out_mem + h
        else:
            out_mem = out_mem + model.output(h)
    out = out_mem / T
    return F.interpolate(out, size=frames.shape[-2:], mode="bilinear", align_corners=True)
