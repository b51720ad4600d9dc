"""The LIF neuron of SLTNet and Spike-BRGNet (``LIFAct`` in both repositories): a hard reset whose spike is
not detached, so that the gradient also flows through the reset (docs/models.md).

The layer runs as one autograd function over its timesteps (``_LIFActLayer``): backward keeps only the input
currents and replays the membrane, where step-by-step autograd would keep three tensors per step.
``run_steps`` is the same neuron through the base class's per-step methods, the reference it is tested
against (tests/test_published.py).
"""

import math
from typing import Optional

import torch

from .base import LIFParams, Neuron, register_neuron


def _fire(u, theta, out):
    """s = H(u / theta - 1) written into ``out`` (float): as the base class's fire decides it; for a threshold
    that is a power of two u / theta is exact and this is u > theta. (A float ``out`` of torch.gt: bool
    tensors and masked_fill are several times slower on the CPU.)"""
    if isinstance(theta, float) and theta > 0 and math.frexp(theta)[0] == 0.5:
        return torch.gt(u, theta, out=out)
    return torch.gt(torch.div(u, theta).sub_(1), 0, out=out)


class _LIFActLayer(torch.autograd.Function):
    """LIFAct over ``[S, N, ...]`` currents: (spikes, final membrane). Backward, step t from the last:
    dL/du_t = (dL/ds_t - c * u_t) * ds/du_t + c * (1 - s_t), with c = dL/du'_t the gradient reaching the
    membrane after the reset (leak * dL/du_{t+1}); dL/dx_t = dL/du_t. The membrane is at least float32."""

    @staticmethod
    def forward(ctx, x, u0, leak, theta, surrogate):
        dtype = torch.promote_types(x.dtype, torch.float32)
        spikes = torch.empty_like(x)
        fired = torch.empty(x.shape[1:], dtype=dtype, device=x.device) if x.dtype != dtype else None
        u = torch.empty(x.shape[1:], dtype=dtype, device=x.device)
        for t in range(x.shape[0]):
            if t > 0:
                charged = u.mul_(leak).add_(x[t])
            elif u0 is None:
                charged = x[0] if x.dtype == dtype else x[0].to(dtype)  # from rest: 0 * leak + x
            else:
                charged = torch.add(x[0], u0, alpha=leak, out=u)
            s = _fire(charged, theta, spikes[t] if fired is None else fired)
            if fired is not None:
                spikes[t] = s
            torch.addcmul(charged, charged, s, value=-1, out=u)  # u * (1 - s): u - u = 0 where it fired
        ctx.save_for_backward(x, u0)
        ctx.leak, ctx.theta, ctx.surrogate = leak, theta, surrogate
        ctx.set_materialize_grads(False)  # an unused final membrane's gradient is None, not zeros to carry back
        return spikes, u

    @staticmethod
    def backward(ctx, grad_spikes, grad_u):
        x, u0 = ctx.saved_tensors
        leak, theta, surrogate = ctx.leak, ctx.theta, ctx.surrogate
        dtype = torch.promote_types(x.dtype, torch.float32)
        steps = x.shape[0]
        fired = torch.empty(x.shape[1:], dtype=dtype, device=x.device)
        if steps == 1 and u0 is None and x.dtype == dtype:
            membranes = x  # one step from rest: u = 0 * leak + x = x
        else:  # replay the membrane before each reset
            membranes = torch.empty(x.shape, dtype=dtype, device=x.device)
            u = torch.zeros_like(fired) if u0 is None else u0.to(dtype)
            for t in range(steps):
                if t == 0 and u0 is None:
                    membranes[0].copy_(x[0])
                else:
                    torch.add(x[t], u, alpha=leak, out=membranes[t])
                if t < steps - 1:
                    u = torch.addcmul(membranes[t], membranes[t], _fire(membranes[t], theta, fired), value=-1)
        if steps == 1 and grad_u is None:  # one step, final state unused: the surrogate's result is all of it
            grad_s = grad_spikes[0] if grad_spikes is not None else torch.zeros_like(membranes[0])
            grad = surrogate.spike_backward(grad_s, membranes[0], theta)
            grad_u0 = grad * leak if u0 is not None and ctx.needs_input_grad[1] else None
            return grad.unsqueeze(0).to(x.dtype), grad_u0, None, None, None
        grad_x = torch.empty(x.shape, dtype=dtype, device=x.device)
        carry = grad_u  # dL/du' after the last reset: None unless the final state is used
        for t in reversed(range(steps)):
            u_t, out = membranes[t], grad_x[t]
            grad_s = grad_spikes[t] if grad_spikes is not None else torch.zeros_like(u_t)
            if carry is None:
                out.copy_(surrogate.spike_backward(grad_s, u_t, theta))
            else:
                torch.mul(carry, u_t, out=out)
                out.copy_(surrogate.spike_backward(torch.sub(grad_s, out, out=out), u_t, theta))
                out.add_(carry).addcmul_(carry, _fire(u_t, theta, fired), value=-1)  # + c * (1 - s)
            carry = out * leak
        grad_u0 = carry if u0 is not None and ctx.needs_input_grad[1] else None
        return grad_x.to(x.dtype), grad_u0, None, None, None


@register_neuron
class LIFAct(Neuron):
    """u = leak * u + I; fires where u > theta; reset to zero by u * (1 - s) with s not detached, so
    d u_next / d u = (1 - s) - u * ds/du. The published settings: ``leak_mem`` 0.25, ``def_threshold`` 0.5,
    ``reset`` zero, ``surrogate`` clamped_tanh (alpha 1.5). Generic path only (the fused backends detach
    the reset); with the negative threshold (``leaky``) it runs step by step."""

    kind = "lifact"
    ignores = {"detach_reset": "its reset always keeps the spike's gradient, as the published LIFAct's does"}

    def charge(self, state, current):
        return (state[0] * self.leak + current, *state[1:])

    def reset(self, state, spike):
        """The zero reset as the authors write it, u * (1 - s): the base class's u * (1 - |s|) would
        stop the gradient where s = 0 (|s|' = sign(0) = 0)."""
        if self.hard_reset and self.alpha is None:
            return (state[0] * (1 - spike), *state[1:])
        return super().reset(state, spike)

    def run_generic(self, x, state):
        theta, theta_neg = self.thresholds()
        if not self.hard_reset or theta_neg is not None or isinstance(theta, torch.Tensor):
            return self.run_steps(x, state)
        u0 = None if state is None else state[0]
        spikes, u = _LIFActLayer.apply(x, u0, float(self.leak), theta, self.surrogate)
        return spikes, (u,)

    def run_steps(self, x, state):
        """The base class's loop with the spike kept attached in the reset."""
        state = self.initial_state(x[0]) if state is None else state
        out = []
        for t in range(x.shape[0]):
            state = self.charge(state, x[t])
            spike = self.fire(state)
            state = self.reset(state, spike)
            out.append(spike.to(x.dtype))
        return torch.stack(out), tuple(state)

    def lif_params(self) -> Optional[LIFParams]:
        return None

    def nir_leak(self):
        return float(self.leak)
