"""utils/energy.py: SOPs against a per-spike brute force, MACs against the closed form."""

import pytest
import torch
import torch.nn as nn

import models
from models import resolve_model_config
from models.network import SegmentationNet
from models.neurons import LIF
from models.protocol import NotSupported
from utils.energy import PJ_TO_MJ, OpCounter


class Tiny(SegmentationNet):
    """dilated conv unit -> avg pool -> grouped conv unit -> 1x1 conv unit, whose spikes are added to the
    grouped unit's (a residual ADD: levels 0..2) and read by the 1x1 readout. No BN, hand-set weights (all
    +1 or +0.5), so the spikes are a fixed function of the input spikes."""

    def build(self, cfg, parts):
        self.conv1 = parts.conv_unit(2, 4, 3, dilation=2)
        self.pool = parts.avg_pool(3, stride=2, padding=1)
        self.conv2 = parts.conv_unit(4, 4, 3, groups=2)
        self.conv3 = parts.conv_unit(4, 4, 1)
        self.add = parts.add()
        self.head = parts.readout(4, 2)

    def init_weights(self):
        with torch.no_grad():
            for unit, value in ((self.conv1, 1.0), (self.conv2, 0.5), (self.conv3, 1.0)):
                unit.conv.weight.fill_(value)
            self.head.weight.fill_(1.0)

    def forward_steps(self, h):
        s2 = self.conv2(self.pool(self.conv1(h)))
        return self.add(s2, self.conv3(s2))


def tiny_net(cls=Tiny, **extra):
    base = dict(arch="dl-vgg9", num_classes=2, in_channels=2, timesteps=2, bn=False, def_threshold=0.9)
    cfg = resolve_model_config({**base, **extra})
    return cls({**cfg, "arch": "tiny"}).eval()


def brute_force_sops(inputs, chain):
    """For each input event, one impulse through the chain's real layers: the output elements (positions x
    channels) it reaches are those that come out non-zero (all weights are positive, so nothing cancels);
    an event of value v counts v times."""
    total = 0
    n_t, channels, height, width = inputs.shape
    for sample, c, i, j in torch.nonzero(inputs).tolist():
        impulse = torch.zeros(1, channels, height, width)
        impulse[0, c, i, j] = 1.0
        out = impulse
        for layer in chain:
            out = layer(out)
        total += abs(float(inputs[sample, c, i, j])) * int((out != 0).sum())
    return total


def recorded_inputs(model, x):
    """The input of every part of one forward, by name (hooks written here, not the counter's)."""
    seen = {}
    hooks = [
        part.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, a) and None) for n, part in model.parts()
    ]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_sops_of_a_small_residual_net_match_a_per_event_brute_force():
    torch.manual_seed(0)
    model = tiny_net(encoder="poisson")
    x = (torch.rand(1, 2, 8, 8) - 0.5) * 1.8  # dense signed input spikes
    with torch.no_grad():
        torch.manual_seed(1)
        seen = recorded_inputs(model, x)
        torch.manual_seed(1)  # the same Poisson draws
        with OpCounter(model) as counter:
            model(x)
    rows = {row["name"]: row for row in counter.summary()["per_layer"]}
    residual = seen["head"][0]  # the time-mean of the ADD: the readout is counted on the sum at every step
    summed = seen["add"][0] + seen["add"][1]
    assert residual.shape[0] == 1 and summed.max() == 2, "the hand-set weights must make coinciding spikes"
    with torch.no_grad():
        pool_input = seen["pool"][0]
        expected = {
            "conv1": brute_force_sops(seen["conv1"][0], [model.conv1.conv]),
            "conv2": brute_force_sops(pool_input, [model.pool, model.conv2.conv]),
            "conv3": brute_force_sops(seen["conv3"][0], [model.conv3.conv]),
            "head": brute_force_sops(summed, [model.head]),
        }
    for name, sops in expected.items():
        assert rows[name]["sops"] == sops and sops > 0, name
        assert rows[name]["macs"] == 0, name
    assert rows["conv1"]["input"] == "signed spikes"
    assert rows["conv2"]["input"] == "pooled spikes" and rows["conv2"]["via"] == ["pool"]
    assert rows["head"]["input"] == "spikes (levels up to 2)"
    # a level-2 event is two spikes: the events counted are the sum of the values
    assert rows["head"]["spikes_in"] == float(summed.abs().sum())
    rate = float((seen["conv1"][0] != 0).sum()) / seen["conv1"][0].numel()
    assert rows["conv1"]["sops_rate_estimate"] == pytest.approx(rate * closed_form(8, 8, 2, 4, 3) * 2)
    # interior events of conv1 reach 9 positions x 4 channels; border events fewer
    assert 0 < rows["conv1"]["mean_fan_out"] < 36


class Halved(LIF):
    """Emits s / 2 but does not say so (its emits() is LIF's: binary spikes)."""

    kind = ""

    def forward(self, x, steps=None, norm=None, conv=None):
        return super().forward(x, steps, norm, conv) / 2


def test_a_layer_that_emits_other_values_than_it_declares_is_an_error_naming_it():
    model = tiny_net(encoder="direct", def_threshold=0.5)
    model.conv1.act.__class__ = Halved
    with torch.no_grad(), OpCounter(model) as counter, pytest.raises(ValueError) as err:
        model(torch.rand(1, 2, 8, 8))
    assert "layer conv2" in str(err.value) and "0.5" in str(err.value) and counter.layers


class PlainSum(Tiny):
    def forward_steps(self, h):
        s2 = self.conv2(self.pool(self.conv1(h)))
        return self.conv3(s2) + s2  # a plain '+': the graph cannot follow it


class RawConv(Tiny):
    def build(self, cfg, parts):
        super().build(cfg, parts)
        self.extra = nn.Conv2d(4, 4, 1)

    def forward_steps(self, h):
        return self.extra(super().forward_steps(h))


@pytest.mark.parametrize(
    "cls, words", [(PlainSum, ["layer head", "outside the parts"]), (RawConv, ["layer extra", "not a part"])]
)
def test_a_network_the_graph_cannot_follow_is_refused_before_it_runs(cls, words):
    model = tiny_net(cls, encoder="direct")
    with pytest.raises(NotSupported) as err:
        OpCounter(model).__enter__()
    assert all(word in str(err.value) for word in words) and "energy" in str(err.value)


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


class GroupedUp(SegmentationNet):
    def build(self, cfg, parts):
        self.down = parts.conv_unit(4, 6, 3, stride=2, groups=2)
        self.score = parts.skip_score(4, 6)
        self.up = parts.decoder_stage(6, spiking=False)

    def forward_steps(self, h):
        return self.up(self.down(h), self.score(h))


def test_transposed_and_grouped_conv_macs():
    cfg = resolve_model_config(dict(arch="dl-vgg9", model_type="ann", num_classes=6, in_channels=4, img_size=[10, 10]))
    net = GroupedUp({**cfg, "arch": "grouped"}).eval()
    with torch.no_grad(), OpCounter(net) as counter:
        out = net(torch.randn(2, 4, 10, 10))
    assert out.shape[-2:] == (10, 10)
    rows = counter.summary()["per_layer"]
    assert [row["name"] for row in rows] == ["down", "score", "up"]
    assert rows[0]["macs"] == closed_form(5, 5, 4, 6, 3, groups=2)
    # transposed conv: every one of the 5x5x6 inputs is multiplied by its 3x3x6 weights
    assert rows[2]["macs"] == 5 * 5 * 6 * 3 * 3 * 6


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
    assert rows[0]["input"] == "signed spikes"  # Poisson input spikes are events too


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


def test_ilif_levels_count_as_that_many_spikes_and_synaptic_operations():
    """I-LIF emits 0..D in one step: a level-k spike is k events, counted k times by the energy count (as the
    multi-level papers count it on hardware that unrolls it) and by the spike count; the 1x1 conv's SOPs are
    the levels times its output channels (a hand count), the others a per-event brute force."""
    torch.manual_seed(0)
    model = tiny_net(encoder="direct", neuron="ilif", spike_levels=3, def_threshold=2.0)
    model.record_spikes(True)
    x = torch.rand(1, 2, 8, 8) * 0.1
    with torch.no_grad():
        seen = recorded_inputs(model, x)
        model.reset_spike_stats()
        with OpCounter(model) as counter:
            model(x)
    rows = {row["name"]: row for row in counter.summary()["per_layer"]}
    levels = seen["conv3"][0]
    assert set(levels.unique().tolist()) == {0.0, 1.0, 2.0, 3.0}, "the input must drive every level"
    assert rows["conv3"]["input"] == "spikes (levels up to 3)"
    assert rows["conv3"]["sops"] == float(levels.sum()) * 4  # 1x1 conv: each event reaches the 4 channels
    assert rows["conv3"]["spikes_in"] == float(levels.sum())
    assert rows["conv1"]["sops"] == 0 and rows["conv1"]["macs"] > 0  # direct (analog) input
    with torch.no_grad():
        assert rows["conv2"]["sops"] == brute_force_sops(seen["pool"][0], [model.pool, model.conv2.conv])
        assert rows["head"]["sops"] == brute_force_sops(seen["add"][0] + seen["add"][1], [model.head])
    stats = model.conv2.act.spike_stats()  # conv2's spikes are conv3's input
    assert stats["spikes"] == float(levels.sum()) and stats["levels"] == 3
    assert stats["firing"] == float((levels != 0).sum()) < stats["spikes"]
