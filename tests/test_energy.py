"""utils/energy.py: SOPs against a per-spike brute force, MACs against the closed form."""

import pytest
import torch
import torch.nn as nn

import models
from utils.energy import PJ_TO_MJ, OpCounter


class TinySpiking(nn.Module):
    """dilated conv -> fire -> avgpool -> grouped conv -> fire -> transposed conv, on spikes [N*T, 2, 8, 8].

    Hand-set weights (all +1 or +0.5) make the spikes a fixed function of the input spikes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=2, dilation=2, bias=False)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, bias=False)
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv2.weight.fill_(0.5)
            self.up.weight.fill_(1.0)
        self.inputs = {}

    def forward(self, x):
        self.inputs["conv1"] = x
        s1 = (self.conv1(x) >= 3).float()  # a neuron fires when 3 input spikes reach it
        self.inputs["conv2"] = s1  # the spikes before the pool are conv2's events
        # pool windows overlap, so one spike may reach a conv2 output along two paths: counted once
        s2 = (self.conv2(self.pool(s1)) > 0.2).float()
        self.inputs["up"] = s2
        return self.up(s2)


def brute_force_sops(spikes, chain):
    """For each spike, one impulse through the chain's real layers: the output elements (positions x channels)
    it reaches are those that come out non-zero (all weights are positive, so nothing cancels)."""
    total = 0
    n_t, channels, height, width = spikes.shape
    for sample in range(n_t):
        for c in range(channels):
            for i in range(height):
                for j in range(width):
                    if spikes[sample, c, i, j] == 0:
                        continue
                    impulse = torch.zeros(1, channels, height, width)
                    impulse[0, c, i, j] = 1.0
                    out = impulse
                    for layer in chain:
                        out = layer(out)
                    total += int((out != 0).sum())
    return total


def test_sops_match_per_spike_brute_force():
    torch.manual_seed(0)
    net = TinySpiking().eval()
    steps = 2
    x = (torch.rand(1 * steps, 2, 8, 8) < 0.4).float()
    with torch.no_grad(), OpCounter(net, steps=steps, spiking=True) as counter:
        net(x)
    rows = {row["name"]: row for row in counter.summary()["per_layer"]}
    assert net.inputs["conv2"].sum() > 0 and net.inputs["up"].sum() > 0, "the hand-set weights must make spikes"
    with torch.no_grad():
        expected = {
            "conv1": brute_force_sops(net.inputs["conv1"], [net.conv1]),
            "conv2": brute_force_sops(net.inputs["conv2"], [net.pool, net.conv2]),
            "up": brute_force_sops(net.inputs["up"], [net.up]),
        }
    for name, sops in expected.items():
        assert rows[name]["sops"] == sops, name
        assert rows[name]["spikes_in"] == float((net.inputs[name] != 0).sum()), name
        assert rows[name]["macs"] == 0 and rows[name]["input"] == "spikes"
    assert rows["conv2"]["via"] == ["AvgPool2d"]
    rate = float((x != 0).sum()) / x.numel()
    assert rows["conv1"]["sops_rate_estimate"] == pytest.approx(rate * closed_form(8, 8, 2, 4, 3) * steps)
    # interior spikes of conv1 reach 9 positions x 4 channels; border spikes fewer
    assert 0 < rows["conv1"]["mean_fan_out"] < 36


def test_negative_spikes_count_as_events():
    torch.manual_seed(1)
    net = TinySpiking().eval()
    x = (torch.rand(2, 2, 8, 8) < 0.4).float()
    signed = x * torch.where(torch.rand_like(x) < 0.5, -1.0, 1.0)
    with torch.no_grad(), OpCounter(net, steps=2, spiking=True) as counter:
        net.conv1(signed)
    assert counter.summary()["per_layer"][0]["sops"] == brute_force_sops(signed, [net.conv1])


def closed_form(h_out, w_out, c_in, c_out, k, groups=1):
    return h_out * w_out * c_out * c_in * k * k // groups


def test_ann_macs_are_the_closed_form_summed_over_layers():
    cfg = dict(models.MODEL_DEFAULTS, model_type="ann", arch="dl-vgg9", num_classes=4, img_size=[16, 16])
    model = models.build_model(cfg).eval()
    with torch.no_grad(), OpCounter(model) as counter:
        model(torch.randn(3, 3, 16, 16))
    # dl-vgg9 at 16x16: 64, 64, pool, 128, 128, pool, 256, 256 (d2), 256 (d2) | 1024 (d12), 1x1 output
    layers = [
        (16, 3, 64, 3),
        (16, 64, 64, 3),
        (8, 64, 128, 3),
        (8, 128, 128, 3),
        (4, 128, 256, 3),
        (4, 256, 256, 3),
        (4, 256, 256, 3),
        (4, 256, 1024, 3),
        (4, 1024, 4, 1),
    ]
    expected = [closed_form(s, s, c_in, c_out, k) for s, c_in, c_out, k in layers]
    summary = counter.summary(mac_pj=4.6, ac_pj=0.9)
    assert [row["macs"] for row in summary["per_layer"]] == expected
    assert summary["macs"] == sum(expected) and summary["sops"] == 0
    assert summary["energy_mj"] == pytest.approx(sum(expected) * 4.6 * PJ_TO_MJ)


def test_transposed_and_grouped_conv_macs():
    net = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
        nn.ConvTranspose2d(6, 3, 3, stride=2, padding=1, bias=False),
    )
    with torch.no_grad(), OpCounter(net, steps=1, spiking=False) as counter:
        out = net(torch.randn(2, 4, 10, 10))
    assert out.shape[-2:] == (9, 9)
    rows = counter.summary()["per_layer"]
    assert rows[0]["macs"] == closed_form(5, 5, 4, 6, 3, groups=2)
    # transposed conv: every one of the 5x5x6 inputs is multiplied by its 3x3x3 weights
    assert rows[1]["macs"] == 5 * 5 * 6 * 3 * 3 * 3


def small_snn(encoder, **extra):
    cfg = dict(
        models.MODEL_DEFAULTS,
        model_type="snn",
        arch="dl-vgg9",
        num_classes=4,
        img_size=[16, 16],
        timesteps=3,
        encoder=encoder,
        def_threshold=0.05,
        **extra,
    )
    return models.build_model(cfg).eval()


def test_direct_encoding_first_layer_is_macs_times_steps_and_zero_tail_is_free():
    model = small_snn("direct", full_prop=True)
    assert model.extra_steps > 0
    with torch.no_grad(), OpCounter(model) as counter:
        model(torch.rand(2, 3, 16, 16) - 0.5)
    first = counter.summary()["per_layer"][0]
    assert first["input"] == "analog" and first["sops"] == 0
    assert first["macs"] == 3 * closed_form(16, 16, 3, 64, 3)  # T steps, not the full-propagation tail


def test_deeplab_output_conv_counts_the_last_spikes_at_every_step():
    torch.manual_seed(0)
    model = small_snn("poisson")
    model.record_spikes(True)
    x = torch.rand(2, 3, 16, 16) - 0.5
    with torch.no_grad(), OpCounter(model) as counter:
        model(x)
    rows = counter.summary()["per_layer"]
    last_layer_spikes = model.spike_stats()[-1]["spikes"] / 2  # per image
    assert last_layer_spikes > 0
    output = rows[-1]
    assert output["name"] == "output" and output["input"] == "spikes"
    assert output["sops"] == pytest.approx(last_layer_spikes * 4)  # 1x1 conv: each spike reaches 4 classes
    assert rows[0]["input"] == "spikes"  # Poisson input spikes are events too


def test_fcn_decoder_and_scores_are_counted():
    model = models.build_model(
        dict(
            models.MODEL_DEFAULTS,
            model_type="snn",
            arch="fcn-vgg9",
            num_classes=3,
            img_size=[16, 16],
            timesteps=2,
            def_threshold=0.05,
        )
    ).eval()
    with torch.no_grad(), OpCounter(model) as counter:
        model(torch.rand(1, 3, 16, 16) - 0.5)
    names = [row["name"] for row in counter.summary()["per_layer"]]
    assert sum(name.startswith("decoder.") for name in names) == 3
    assert len(names) == 9 + 4 + 3  # 9 convs, 4 scores, 3 transposed convs
