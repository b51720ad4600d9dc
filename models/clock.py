"""The clock: where in time the block of timesteps that a network is running now lies.

Tensors flow time-folded, ``[S*N, C, H, W]`` (time-major), so a convolution or a pooling layer does not care
about time; only the layers that do (BNTT, neurons) read the clock. The network owns one clock and hands it
to every ``Timed`` module it contains when it is built; for each block of timesteps it sets the clock (how
many steps, the first one, the neurons' states carried in) and clears it afterwards. An architecture's
``forward`` therefore takes and returns plain tensors, whatever its topology.
"""

from typing import Optional


class Clock:
    """The running block: ``steps`` timesteps from ``t0``; ``states`` maps each neuron layer to its state
    (carried in at ``t0 > 0``, written back at the end of the block); ``recompute``: spiking units recompute
    their convolution in backward (memory-saving mode); ``replaying``: memory-saving mode is replaying this
    block in backward (batch norm must not update its statistics twice); ``per_step``: the per-timestep
    reference execution (plain PyTorch ops, one timestep per block: benchmarks/baseline.py)."""

    def __init__(self, steps: int = 1):
        self.per_step = False
        self.set(steps)

    def set(self, steps: int, t0: int = 0, states: Optional[dict] = None, recompute=False, replaying=False):
        self.steps, self.t0, self.recompute, self.replaying = int(steps), int(t0), recompute, replaying
        self.states = {} if states is None else states
        return self

    def clear(self):
        """Drop the states (and the autograd graph they hold) once a block is done."""
        self.states = {}


class Timed:
    """Mixin of the modules that read the clock. A network attaches its clock to each of them; a module used
    on its own (outside a network) gets a clock of its own from the ``steps`` its caller passes."""

    clock: Optional[Clock] = None

    def clock_for(self, steps: Optional[int]) -> Clock:
        """The network's clock, or a fresh one for ``steps`` timesteps when the caller gives them."""
        if steps is not None:
            return Clock(steps)
        if self.clock is None:
            raise ValueError(
                f"{type(self).__name__} runs inside a network, whose clock says how many timesteps its input "
                "holds; on its own, call it with steps=S"
            )
        return self.clock
