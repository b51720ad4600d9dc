"""The surrogate derivatives of models/surrogates.py as Triton device functions, and ds/du from them.

A surrogate is chosen at compile time (``KIND``, a constexpr: one specialisation of the backward kernel
per surrogate in use) and its parameters are read at run time, so a new parameter value compiles nothing.
"""

import triton
import triton.language as tl

from .primitives import div

# Surrogate name -> (compile-time kind, its parameters in the order the kernel reads them).
KINDS = {
    "linear": (0, ("gamma",)),
    "fast_sigmoid": (1, ("scale",)),
    "exp": (2, ("alpha", "beta")),
    "pass_through": (3, ()),
    "atan": (4, ("alpha",)),
    "sigmoid": (5, ("alpha",)),
    "clamped_tanh": (6, ("alpha",)),
    "rect": (7, ("alpha",)),
}


def surrogate_args(surrogate):
    """(kind, (p0, p1)) of a models.surrogates.Surrogate for the kernels."""
    if surrogate.name not in KINDS:
        raise ValueError(f"neuron_backend 'triton' has no kernel for surrogate '{surrogate.name}'")
    kind, names = KINDS[surrogate.name]
    values = tuple(float(surrogate.params[name]) for name in names) + (0.0, 0.0)
    return kind, values[:2]


@triton.jit
def surrogate(x, p0, p1, KIND: tl.constexpr):
    """g(x) of models/surrogates.py (KIND in KINDS' order)."""
    if KIND == 0:  # linear: gamma * max(0, 1 - |x|)
        g = p0 * tl.maximum(1.0 - tl.abs(x), 0.0)
    elif KIND == 1:  # fast_sigmoid: (scale * |x| + 1)^-2
        d = p0 * tl.abs(x) + 1.0
        g = div(tl.full(x.shape, 1.0, x.dtype), d * d)
    elif KIND == 2:  # exp: alpha * exp(-beta * |x|)
        g = p0 * tl.exp(-p1 * tl.abs(x))
    elif KIND == 3:  # pass_through
        g = tl.full(x.shape, 1.0, x.dtype)
    elif KIND == 4:  # atan: (alpha / 2) / (1 + (pi / 2 * alpha * x)^2)
        z = (1.5707963267948966 * p0) * x
        g = div(tl.full(x.shape, 1.0, x.dtype) * (p0 * 0.5), 1.0 + z * z)
    elif KIND == 5:  # sigmoid: alpha * s * (1 - s), s = sigmoid(alpha * x)
        s = div(tl.full(x.shape, 1.0, x.dtype), 1.0 + tl.exp(-(p0 * x)))
        g = p0 * s * (1.0 - s)
    elif KIND == 6:  # clamped_tanh: alpha * sech(alpha * x)^2 / (2 tanh(alpha)) for |x| < 1, else 0
        a = p0 + tl.zeros_like(x)  # alpha in x's precision: tanh(alpha) below is not a compile-time constant
        e = tl.exp(-2.0 * tl.abs(a * x))
        ea = tl.exp(-2.0 * a)
        g = div(a * 4.0 * e * (1.0 + ea), 2.0 * (1.0 - ea) * (1.0 + e) * (1.0 + e))
        g = tl.where(tl.abs(x) < 1.0, g, 0.0)
    else:  # rect: alpha where |x| < 0.5 / alpha, else 0
        a = p0 + tl.zeros_like(x)
        g = tl.where(tl.abs(x) < div(tl.full(x.shape, 0.5, x.dtype), a), a, 0.0)
    return g


@triton.jit
def slope(u, theta, theta_neg, p0, p1, KIND: tl.constexpr, NEG: tl.constexpr):
    """ds/du at the charged membrane: g(u / theta - 1) / theta (minus the negative threshold's term)."""
    ds = div(surrogate(div(u, theta) - 1.0, p0, p1, KIND), theta)
    if NEG:
        ds = ds - div(surrogate(div(u, theta_neg) - 1.0, p0, p1, KIND), theta_neg)
    return ds
