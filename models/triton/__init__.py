"""The neurons' Triton backend: BNTT + LIF over all S timesteps of a layer in a few fused kernels.

Same API as models/lif_torch.py (see its docstring; models/neurons/base.py chooses the backend)::

    forward(x, u0, params, bn, keep_spikes) -> (spikes, compact, u, mean, invstd)
    backward(x, u0, compact, mean, invstd, weight, grad_spikes, grad_u_end, params, bn)
        -> (grad_x, grad_u0, grad_weight)

Split by job: ``bn_stats`` (BN's batch statistics), ``neuron_kernels`` (the LIF forward, backward and
dL/dx kernels), ``surrogates`` (the surrogate derivatives as device functions), ``primitives`` (device
helpers they share) and ``launch`` (tiles, grids, layouts and the API above). docs/gpu.md describes the
kernels and their numerics.
"""

try:
    import triton  # noqa: F401
except ImportError as error:  # models/fused.py catches this and falls back to the torch backend
    raise ImportError(
        f"neuron_backend 'triton' needs the triton package ({error}); install triton or use neuron_backend 'torch'"
    ) from error

# _INTERPRETED: whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when imported).
from .launch import _INTERPRETED, backward, forward  # noqa: F401
