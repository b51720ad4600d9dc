"""What every neuron class declares and what follows from it (docs/neurons.md, "The spike contract"): a class
without ``charge`` fails when it is built, keys a neuron ignores are refused in one line, ``detach_reset``
passes the spike's gradient through the reset (and takes the model off the fused backends), and ``compile``
is refused where the generic path runs the neurons."""

import pytest
import torch

import train
from models import build_model
from models.neurons import LIF, NEURONS, Neuron, register_neuron
from tests.conftest import one_line_error
from tests.reference_snn import heaviside_surrogate, linear_grad

torch.set_num_threads(2)


def test_a_neuron_class_without_charge_fails_when_defined_or_built_in_one_line():
    class NoCharge(Neuron):
        kind = "nocharge"

    with pytest.raises(ValueError) as err:
        register_neuron(NoCharge)
    assert "\n" not in str(err.value) and "NoCharge" in str(err.value) and "charge(state, current)" in str(err.value)
    assert "nocharge" not in NEURONS
    with pytest.raises(ValueError, match="NoCharge defines no charge"):
        NoCharge()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--neuron", "if", "--leak_mem", "0.5"], ["--leak_mem", "neuron 'if'", "no leak"]),
        (["--neuron", "if", "--leak_mem", "0.99"], ["--leak_mem", "neuron 'if'"]),  # typed: refused at any value
        (["--neuron", "plif", "--compile"], ["compile", "neuron 'plif'", "generic path"]),
        (["--neuron_backend", "generic", "--compile"], ["compile", "neuron_backend 'generic'"]),
        (["--neuron_backend", "torch", "--detach_reset", "false"], ["'torch'", "detach_reset false"]),
        (["--spike_levels", "128"], ["spike_levels", "127"]),
    ],
)
def test_options_a_neuron_does_not_support_are_one_line_errors_before_any_work(capsys, argv, words):
    one_line_error(capsys, train.main, ["--epochs", "1", *argv], *words)


def test_a_config_file_that_spells_out_the_defaults_does_not_trip_the_ignored_keys(tmp_path):
    from utils.config import all_defaults, check_combinations

    config = {**all_defaults(), "neuron": "if", "dataset": "synthetic"}
    check_combinations(config, {"leak_mem": "configs/voc2012-snn-deeplab.yaml", "neuron": "--neuron"})  # 0.99
    with pytest.raises(ValueError, match=r"leak_mem \(set in paper.yaml\) means nothing to neuron 'if'"):
        check_combinations({**config, "leak_mem": 0.5}, {"leak_mem": "paper.yaml"})


def hand_lif_through_the_reset(currents, leak, theta):
    """LIF with the reset u - theta * s where s keeps its surrogate gradient (SpikingJelly's
    detach_reset=False), written out with autograd: the spikes, differentiable."""
    u, out = torch.zeros_like(currents[0]), []
    for current in currents:
        u = leak * u + current
        s = heaviside_surrogate(u / theta - 1, linear_grad)
        u = u - theta * s
        out.append(s)
    return torch.stack(out)


def test_detach_reset_false_passes_the_spike_gradient_through_the_reset():
    torch.manual_seed(0)
    currents = (torch.rand(8, 2, 3, 4, 4, dtype=torch.float64) * 0.9).requires_grad_()
    weights = torch.randn_like(currents)
    neuron = LIF(0.9, 0.625, detach_reset=False, backend="auto").double()
    assert neuron.lif_params() is None and neuron.accelerator(currents.device) is None  # generic path
    spikes, _ = neuron.run_generic(currents, None)
    (grad,) = torch.autograd.grad((spikes * weights).sum(), currents)
    expected_spikes = hand_lif_through_the_reset(currents, 0.9, 0.625)
    (expected,) = torch.autograd.grad((expected_spikes * weights).sum(), currents)
    assert torch.equal(spikes, expected_spikes) and spikes.sum() > 20
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    detached, _ = LIF(0.9, 0.625, backend="generic").double().run_generic(currents, None)
    (grad_detached,) = torch.autograd.grad((detached * weights).sum(), currents)
    assert torch.equal(detached, spikes) and not torch.allclose(grad_detached, grad)


def test_detach_reset_default_is_todays_model():
    torch.manual_seed(0)
    default = build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3, encoder="direct"))
    torch.manual_seed(0)
    explicit = build_model(dict(arch="dl-vgg9", timesteps=2, num_classes=3, encoder="direct", detach_reset=True))
    assert all(n.detach_reset and n.lif_params() is not None for n in explicit.neuron_layers())
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(default(x), explicit(x))


def test_the_zero_reset_of_a_multi_level_neuron_clears_the_membrane_after_any_level():
    """The base class's zero reset follows the declared levels: u * (1 - |s|) would turn a level-2 spike into
    -u; I-LIF with reset zero is written out here (its published reset subtracts)."""
    from models.neurons import ILIF

    torch.manual_seed(0)
    currents = torch.rand(8, 2, 3, 4, 4, dtype=torch.float64) * 2
    neuron = ILIF(0.5, 0.5, spike_levels=3, reset="zero", backend="generic").double()
    spikes, (v,) = neuron.run_generic(currents, None)
    u, expected = torch.zeros_like(currents[0]), []
    for current in currents:
        u = 0.5 * u + current
        s = torch.round(torch.clamp(u / 0.5, 0, 3))
        u = torch.where(s > 0, torch.zeros_like(u), u)
        expected.append(s)
    assert torch.equal(spikes, torch.stack(expected)) and (spikes >= 2).sum() > 20
    torch.testing.assert_close(v, u, rtol=0, atol=1e-15)
    assert (v >= 0).all()
