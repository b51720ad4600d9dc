"""Surrogate derivatives for the Heaviside spike function.

A spike is ``H(x)`` with ``x = u / theta - 1``: the forward pass is the exact step, the backward pass
replaces the Dirac delta ``H'(x)`` by a smooth bump ``g(x)``. Each surrogate here is only that bump:
the neuron (``models.neurons``) owns the forward step and the recurrence, so there is one place that
decides what a spike is.
"""

import math

import torch


class Surrogate:
    """A named surrogate derivative ``g(x)`` with keyword hyperparameters."""

    name = ""
    defaults: dict = {}

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"surrogate '{self.name}' got unknown parameter(s) {unknown}; "
                f"it takes {sorted(self.defaults) or 'none'}"
            )
        self.params = {**self.defaults, **{k: float(v) for k, v in params.items()}}

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad_(self, x: torch.Tensor) -> torch.Tensor:
        """``g(x)`` written over ``x`` (the neurons' backward reuses its buffers)."""
        return x.copy_(self.grad(x))

    def spike_backward(self, grad: torch.Tensor, u: torch.Tensor, theta: float) -> torch.Tensor:
        """``grad * ds/du`` for the spike ``H(u / theta - 1)`` of a float threshold: ``grad * g(u / theta - 1)
        / theta``. A surrogate may override it with fewer passes over memory (the CPU's cost is the passes)."""
        return self.grad_(torch.div(u, theta).sub_(1)).div_(theta).mul_(grad)

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"


class Linear(Surrogate):
    """Piecewise linear (Bellec et al. 2018): ``gamma * max(0, 1 - |x|)``."""

    name, defaults = "linear", {"gamma": 0.3}

    def grad(self, x):
        return self.params["gamma"] * torch.clamp(1.0 - x.abs(), min=0.0)

    def grad_(self, x):
        return x.abs_().neg_().add_(1.0).clamp_(min=0.0).mul_(self.params["gamma"])


class FastSigmoid(Surrogate):
    """SuperSpike (Zenke & Ganguli 2018): ``1 / (scale * |x| + 1)^2``."""

    name, defaults = "fast_sigmoid", {"scale": 100.0}

    def grad(self, x):
        return (self.params["scale"] * x.abs() + 1.0).pow(-2)


class Exponential(Surrogate):
    """Shrestha & Orchard 2018: ``alpha * exp(-beta * |x|)``."""

    name, defaults = "exp", {"alpha": 1.0, "beta": 10.0}

    def grad(self, x):
        return self.params["alpha"] * torch.exp(-self.params["beta"] * x.abs())


class PassThrough(Surrogate):
    """Straight-through: the gradient passes unchanged."""

    name, defaults = "pass_through", {}

    def grad(self, x):
        return torch.ones_like(x)


class ArcTan(Surrogate):
    """Derivative of ``atan(pi/2 * alpha * x) / pi + 1/2`` (Fang et al. 2021)."""

    name, defaults = "atan", {"alpha": 2.0}

    def grad(self, x):
        a = self.params["alpha"]
        return (a / 2) / (1 + (math.pi / 2 * a * x).pow(2))


class Sigmoid(Surrogate):
    """Derivative of ``sigmoid(alpha * x)``."""

    name, defaults = "sigmoid", {"alpha": 4.0}

    def grad(self, x):
        s = torch.sigmoid(self.params["alpha"] * x)
        return self.params["alpha"] * s * (1 - s)


class Rectangle(Surrogate):
    """Rectangular window: ``alpha`` where ``|x| < 0.5 / alpha``, else 0 (SpikingJelly's ``Rect``, CLIF's default)."""

    name, defaults = "rect", {"alpha": 1.0}

    def grad(self, x):
        a = self.params["alpha"]
        return a * (x.abs() < 0.5 / a).to(x.dtype)


class ClampedTanh(Surrogate):
    """Derivative of ``0.5 + tanh(alpha * clamp(x, -1, 1)) / (2 tanh(alpha))``: ``alpha * (1 - tanh(alpha *
    x)^2) / (2 tanh(alpha))`` for |x| < 1, zero elsewhere (at |x| = 1 too, as torch.clamp's backward).
    SLTNet's and Spike-BRGNet's surrogate (temperature 3 on u / 1.0 with threshold 0.5: alpha 1.5)."""

    name, defaults = "clamped_tanh", {"alpha": 1.5}

    def grad(self, x):
        """sech^2 from exp (1 - tanh^2 in another rounding; faster on the CPU than tanh), zero for |x| >= 1."""
        a = self.params["alpha"]
        y = x.abs()
        inside = torch.lt(y, 1, out=torch.empty_like(y))  # a float mask: bool ones are slow on the CPU
        e = y.mul_(-2 * a).exp_()  # exp(-2 a |x|): sech(a x)^2 = 4 e / (1 + e)^2
        denominator = (e + 1).square_()
        return e.mul_(2 * a / math.tanh(a)).div_(denominator).mul_(inside)

    def spike_backward(self, grad, u, theta):
        """Five passes instead of thirteen: with z = 2 a (u / theta - 1), sech(a x)^2 = 4 sigmoid(z) (1 -
        sigmoid(z)) (aten's sigmoid_backward, one pass with the product), and the window |x| < 1 is |z| < 2 a,
        which aten's hardtanh_backward applies (zero at the edges, as torch.clamp's backward)."""
        a = self.params["alpha"]
        z = torch.add(torch.tensor(-2 * a, dtype=u.dtype), u, alpha=2 * a / theta)
        inside = torch.ops.aten.hardtanh_backward(grad.to(u.dtype), z, -2 * a, 2 * a)
        slope = torch.ops.aten.sigmoid_backward(inside, z.sigmoid_())
        return slope.mul_(2 * a / math.tanh(a) / theta)


SURROGATES = {
    cls.name: cls for cls in (Linear, FastSigmoid, Exponential, PassThrough, ArcTan, Sigmoid, Rectangle, ClampedTanh)
}


def get_surrogate(name, **params) -> Surrogate:
    """Look a surrogate up by name; ``name`` may already be a Surrogate instance."""
    if isinstance(name, Surrogate):
        return name
    if name not in SURROGATES:
        raise ValueError(f"unknown surrogate '{name}'; choose one of {sorted(SURROGATES)}")
    return SURROGATES[name](**params)
