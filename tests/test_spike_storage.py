"""How spikes are kept for backward (models/spikes.py) and what a neuron declares it emits (Neuron.emits):
nothing kept alive after a step (the saved-tensor hooks once leaked every graph that backward did not reach),
and only integer spikes stored in one byte (a neuron emitting other values gets exact weight gradients)."""

import gc
import weakref

import torch

from models import build_model
from models import spikes as spike_protocol
from models.neurons import LIF

torch.set_num_threads(2)


def test_an_op_that_saves_its_own_output_is_freed_under_the_spike_hooks():
    """sigmoid saves its output for backward; under compact_spikes the saved copy once held the output's
    grad_fn, which held the saved copy: a cycle the garbage collector cannot see (x's size per iteration)."""
    x = torch.randn(256, 256, requires_grad=True)
    refs = []
    with spike_protocol.compact_spikes():
        for _ in range(10):
            y = torch.sigmoid(x)
            refs.append(weakref.ref(y))
            del y
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0
    with spike_protocol.compact_spikes():  # and a graph that backward does reach still computes the gradient
        y = torch.sigmoid(x * 2)
    (grad,) = torch.autograd.grad(y.sum(), x)
    s = torch.sigmoid(x.detach() * 2)
    torch.testing.assert_close(grad, 2 * s * (1 - s))


class Gated(LIF):
    """A LIF whose state also holds a sigmoid of the membrane that nothing reads: the final state is a graph
    that backward never reaches (CLIF's complementary potential is one)."""

    kind = ""

    def initial_state(self, current):
        (u,) = super().initial_state(current)
        return (u, torch.zeros_like(u))

    def charge(self, state, current):
        u = self.leak * state[0] + current
        return (u, torch.sigmoid(u))


def test_training_steps_free_the_final_state_that_backward_never_reaches():
    torch.manual_seed(0)
    model = build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3, encoder="direct", neuron_backend="generic"))
    refs = []
    for layer in model.neuron_layers():
        layer.__class__ = Gated
        run = layer.run_generic

        def recording(x, state, run=run):
            spikes, final = run(x, state)
            refs.extend(weakref.ref(t) for t in final)
            return spikes, final

        layer.run_generic = recording
    x, y = torch.rand(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    gc.collect()
    assert len(refs) == 3 * 2 * len(model.neuron_layers())
    assert [ref() for ref in refs if ref() is not None] == []
