"""Input encoders: turn a network input into T timesteps of first-layer input.

Every encoder returns a time-folded tensor ``[T*N, C, H, W]`` (time-major: index t*N + n) so that
each layer can run its convolution over all timesteps at once. An ANN is the same network with T = 1.
"""

import torch
import torch.nn as nn

from . import protocol, spikes


class PoissonEncoder(nn.Module):
    """Signed rate coding: at every timestep ``s = sign(x) * [rand <= |x|]``, independently."""

    def forward(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        _expect_images(x, "poisson")
        fire = torch.rand((timesteps, *x.shape), device=x.device, dtype=x.dtype) <= x.abs()
        return spikes.mark((fire * torch.sign(x)).flatten(0, 1))

    def activity(self):
        return protocol.spikes(1, signed=True)


class DirectEncoder(nn.Module):
    """Analog current: the same input is fed at every timestep (the first layer does real MACs)."""

    def forward(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        _expect_images(x, "direct")
        return x.unsqueeze(0).expand(timesteps, *x.shape).flatten(0, 1)

    def activity(self):
        return protocol.analog()


class SequenceEncoder(nn.Module):
    """Target history learning: ``x`` is ``[T, N, C, H, W]``, frame t is the input at timestep t."""

    def forward(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        if x.dim() != 5 or x.shape[0] != timesteps:
            raise ValueError(
                f"the 'sequence' encoder expects [T={timesteps}, N, C, H, W] event frames, "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        return x.flatten(0, 1)

    def activity(self):
        return protocol.analog()


class IdentityEncoder(nn.Module):
    """The ANN's input: the image itself, one 'timestep'."""

    def forward(self, x: torch.Tensor, timesteps: int = 1) -> torch.Tensor:
        _expect_images(x, "ann")
        return x

    def activity(self):
        return protocol.analog()


def _expect_images(x, encoder):
    if x.dim() != 4:
        raise ValueError(f"the '{encoder}' encoder expects images [N, C, H, W], got shape {tuple(x.shape)}")


ENCODERS = {"poisson": PoissonEncoder, "direct": DirectEncoder, "sequence": SequenceEncoder}


def build_encoder(name: str) -> nn.Module:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}'; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name]()
