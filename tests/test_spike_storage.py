"""How spikes are kept for backward (models/spikes.py) and what a neuron declares it emits (Neuron.emits):
nothing kept alive after a step (the saved-tensor hooks once leaked every graph that backward did not reach),
and only integer spikes stored in one byte (a neuron emitting other values gets exact weight gradients)."""

import gc
import weakref

import pytest
import torch

from models import build_model, protocol
from models import spikes as spike_protocol
from models.neurons import LIF, Neuron

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


class Halves(Neuron):
    """Emits s / 2 (SpikeYOLO's normalised levels, for D = 2) and says so: analog values."""

    kind = ""

    def charge(self, state, current):
        return (self.leak * state[0] + current,)

    def fire(self, state):
        return super().fire(state) / 2

    def reset(self, state, spike):
        return super().reset(state, spike * 2)

    def emits(self):
        return protocol.analog(sources=(self,))


class Undeclared(Halves):
    """The same values, declared as binary spikes (the base class's emits)."""

    def emits(self):
        return Neuron.emits(self)


def next_conv_weight_gradient(neuron, currents, steps):
    """(spikes, the gradient of a following convolution's weight): the project's convolution under the spike
    hooks, as a network runs it, and F.conv2d on a float copy of the same input, written here."""
    from models.convolution import Conv2d

    torch.manual_seed(1)
    conv = Conv2d(3, 4, 3, padding=1, bias=False).double()
    with spike_protocol.compact_spikes():
        spikes = neuron(currents, steps=steps)
        out = conv(spikes)
    w = torch.randn(out.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * w).sum(), conv.weight)
    weight = conv.weight.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(
        (torch.nn.functional.conv2d(spikes.detach(), weight, padding=1) * w).sum(), weight
    )
    return spikes, grad, expected


def test_a_neuron_declaring_analog_values_gets_exact_weight_gradients():
    torch.manual_seed(0)
    currents = torch.rand(4 * 2, 3, 6, 6, dtype=torch.float64) * 1.5
    spikes, grad, expected = next_conv_weight_gradient(Halves(0.9, backend="generic").double(), currents, 4)
    assert set(spikes.unique().tolist()) == {0.0, 0.5} and not spike_protocol.holds_spikes(spikes)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_integer_levels_are_stored_in_one_byte_and_give_exact_weight_gradients():
    from models.neurons import ILIF

    torch.manual_seed(0)
    currents = torch.rand(4 * 2, 3, 6, 6, dtype=torch.float64) * 3
    spikes, grad, expected = next_conv_weight_gradient(ILIF(0.5, 0.75, backend="generic").double(), currents, 4)
    assert set(spikes.unique().tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}
    assert spike_protocol.storable(spikes)[0].dtype == torch.int8
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_a_neuron_emitting_values_it_does_not_declare_is_refused_before_backward():
    neuron = Undeclared(0.9, backend="generic", name="body.2.act")
    with pytest.raises(ValueError) as err:
        neuron(torch.rand(4 * 2, 3, 6, 6) * 1.5, steps=4)
    message = str(err.value)
    assert "\n" not in message and "body.2.act" in message and "0.5" in message and "protocol.analog()" in message


@pytest.mark.parametrize("levels, one_byte", [(4, True), (100, False)])
def test_a_residual_sum_is_kept_in_one_byte_only_while_its_declared_levels_fit(levels, one_byte):
    """Two maps of I-LIF spikes 0..D added (a residual ADD) hold levels up to 2 D: in int8 while 2 D <= 127,
    else as they are, so that the next convolution's weight gradient stays exact."""
    from models.neurons import ILIF
    from models.parts import Add

    torch.manual_seed(0)
    neurons = [ILIF(0.5, 0.01, spike_levels=levels, backend="generic").double() for _ in range(2)]
    currents = [torch.rand(2 * 2, 3, 6, 6, dtype=torch.float64) * levels * 0.012 for _ in range(2)]
    summed = Add()(*(n(c, steps=2) for n, c in zip(neurons, currents)))
    assert summed.max() > 127 if not one_byte else summed.max() <= 2 * levels
    assert spike_protocol.levels(summed) == 2 * levels
    assert (spike_protocol.storable(summed)[1] is not None) == one_byte
    _, grad, expected = next_conv_weight_gradient(lambda x, steps: summed, None, None)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
