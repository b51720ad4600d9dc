"""The layer protocol: what a layer declares about itself, so that tools ask the layer instead of guessing.

An architecture is an ordinary module built from *parts* (``Part`` subclasses: a spiking conv unit, a
neuron layer, pooling, an ADD, a readout, ...). The tools that need facts about layers (the layer graph,
energy and spike counts, ANN-to-SNN conversion, NIR export) walk the parts of a model and call these
methods; a part that cannot answer for a tool refuses with ``NotSupported``, and the tool names the layer
and itself in one line before any data is read (docs/architectures.md).

- ``activity(inputs)``: what the part's output holds (``Activity``), given what its inputs hold. A neuron
  layer declares its spikes (binary, signed, integer levels); an ADD of spike maps holds integer levels
  up to the sum of its inputs'; average pooling of spikes holds averaged spikes whose events are the
  spikes before the pool; anything else is analog.
- ``synapses()``: the convolutions inside the part and which of its inputs each one reads: where energy
  counts operations, and what conversion scales when a neuron's spike amplitude changes.
- ``conversion_state(prefix)`` / ``conversion_problem()``: how the part's ANN weights become the converted
  SNN's (batch norm folded into the convolution); or why the part does not convert.
- ``nir_layers()`` / ``nir_problems()``: the part as a chain of NIR primitives (``NirConv``, ``NirNeuron``,
  ``NirAvgPool``; an empty chain is the sum of the part's inputs, which NIR forms where edges meet), and
  what NIR cannot express exactly (docs/deployment.md).
"""

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch.nn as nn

SPIKES, ANALOG = "spikes", "analog"


@dataclass(frozen=True)
class Activity:
    """What a tensor holds, as the layer that made it declares. ``levels``: the largest |value| of spikes
    (1 binary, D for integer levels 0..D, k for the sum of k binary maps); ``signed``: -1 values too;
    ``integer``: False for averaged (pooled) spikes, whose events are the spikes before the pool.
    ``sources``: the neuron layers whose spikes this tensor is a linear function of (ADD, pooling,
    upsampling keep them; a convolution starts afresh)."""

    kind: str
    levels: int = 1
    signed: bool = False
    integer: bool = True
    sources: frozenset = field(default_factory=frozenset)

    @property
    def is_spikes(self) -> bool:
        return self.kind == SPIKES

    def describe(self) -> str:
        if not self.is_spikes:
            return ANALOG
        what = "signed spikes" if self.signed else "spikes"
        what += "" if self.levels == 1 else f" (levels up to {self.levels})"
        return what if self.integer else f"pooled {what}"

    def violation(self, values) -> Optional[float]:
        """The first value of the tensor ``values`` that these spikes cannot hold (not an integer, |value|
        above ``levels``, negative unless signed), or None when every value fits the declaration."""
        values = values.detach()
        bad = (values != values.round()) | (values.abs() > self.levels)
        if not self.signed:
            bad |= values < 0
        return float(values[bad].flatten()[0]) if bool(bad.any()) else None


def spikes(levels: int = 1, signed: bool = False, sources=()) -> Activity:
    return Activity(SPIKES, int(levels), bool(signed), True, frozenset(sources))


def analog(sources=()) -> Activity:
    return Activity(ANALOG, 0, True, False, frozenset(sources))


def summed(activities: Sequence[Activity]) -> Activity:
    """The activity of a sum: spikes if every term is (levels add up; pooled if any term is), else analog;
    sources united. Energy counts the events of each term (``Part.events``)."""
    sources = frozenset().union(*(a.sources for a in activities))
    if all(a.is_spikes for a in activities):
        levels, signed = sum(a.levels for a in activities), any(a.signed for a in activities)
        return Activity(SPIKES, levels, signed, all(a.integer for a in activities), sources)
    return analog(sources)


def pooled(activity: Activity) -> Activity:
    """Average pooling of ``activity``: spikes stay events (counted before the pool), values are averaged."""
    return replace(activity, integer=False) if activity.is_spikes else activity


@dataclass(frozen=True)
class Synapse:
    """A convolution inside a part: ``module`` (nn.Conv2d or nn.ConvTranspose2d), which of the part's
    inputs it reads (``input``), its weight's input-channel dimension (``in_dim``: 1 for a convolution, 0
    for a transposed one), and whether it runs once on the time-mean of its input rather than at every
    step (``on_time_mean``: DeepLab's readout)."""

    module: nn.Module
    input: int = 0
    in_dim: int = 1
    on_time_mean: bool = False
    local: str = ""  # the module's name inside the part ('' when the part is the convolution)


class NotSupported(ValueError):
    """A part that a tool cannot handle; the tool adds the layer's name and its own. ``fix``: what would
    make it supported (a config key or another architecture), when something would."""

    def __init__(self, what: str, fix: Optional[str] = None):
        super().__init__(what)
        self.what, self.fix = what, fix


@dataclass(frozen=True)
class NirConv:
    """A convolution for NIR: float64 ``weight`` and ``bias`` (batch norm folded in) and its geometry."""

    weight: object
    bias: object
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    role: str = "conv"


@dataclass(frozen=True)
class NirNeuron:
    """A neuron layer for NIR: u[t] = leak * u[t-1] + I[t], spike when u > threshold, then u = 0.
    ``leak`` and ``threshold``: a float or a tensor broadcasting against [C, H, W]."""

    leak: object
    threshold: object
    role: str = "neuron"


@dataclass(frozen=True)
class NirAvgPool:
    kernel: tuple
    stride: tuple
    padding: tuple
    role: str = "pool"


@dataclass(frozen=True)
class NirProblem:
    """What NIR cannot express exactly: ``what``, the setting that would make it exportable (``fix``), and
    what ``--lossy`` export changes (``lossy``; None: not exportable even then)."""

    what: str
    fix: str
    lossy: Optional[str] = None


class Part(nn.Module):
    """A layer that answers the tools' questions. Subclasses override what they support; every default
    refuses (or, for ``synapses``, declares none)."""

    def activity(self, inputs: Sequence[Activity]) -> Activity:
        raise NotSupported("does not declare what its output holds (Part.activity)")

    def synapses(self) -> Sequence[Synapse]:
        return ()

    def events(self) -> Optional[str]:
        """How spike events pass through a part whose output holds pooled spikes: 'pool' (a linear map whose
        fan-out counts: average pooling), 'sum' (each input's events, unchanged: an ADD); None: they do not."""
        return None

    def conversion_problem(self) -> Optional[str]:
        """None if ANN-to-SNN conversion handles this part; else why not."""
        return "has no conversion rule (Part.conversion_problem / conversion_state)"

    def conversion_state(self, prefix: str) -> dict:
        """State-dict entries (full keys) of the converted SNN that differ from the ANN's (folded BN)."""
        return {}

    def nir_layers(self) -> Sequence:
        """The part as a chain of NIR primitives (empty: the sum of its inputs)."""
        raise NotSupported("has no NIR form (Part.nir_layers)")

    def nir_problems(self) -> Sequence[NirProblem]:
        """What the chain of ``nir_layers`` does not express exactly."""
        return ()


def outer_parts(model: nn.Module):
    """(name, part) of the parts of ``model`` that are not inside another part, in definition order."""
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, Part) and module is not model:
            found.append((name, module))
            inside.append(name)
    return found
