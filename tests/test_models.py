"""Architectures, encoders, BNTT and the multi-step network against a per-timestep reference."""

import pytest
import torch
import torch.nn as nn
import torchvision

from models import ARCHITECTURES, MODEL_DEFAULTS, build_model
from models.parts import ConvUnit, Rectifier, TimeBatchNorm
from tests.reference_snn import per_timestep_forward

torch.set_num_threads(2)


# The architectures that take any input size and have an ANN twin; the published spiking networks (sltnet,
# spike-brgnet: image sides multiples of 8, no twin) are tested in tests/test_published.py.
GENERIC = sorted(name for name, (cls, _) in ARCHITECTURES.items() if cls.ann_twin)


def tiny(arch="dl-vgg9", **kw):
    cfg = dict(arch=arch, timesteps=2, num_classes=4, in_channels=3, encoder="direct")
    cfg.update(kw)
    return build_model(cfg)


@pytest.mark.parametrize("arch", GENERIC)
@pytest.mark.parametrize("model_type", ["ann", "snn"])
@pytest.mark.parametrize("channels", [3, 2])
def test_forward_backward_any_size(arch, model_type, channels):
    torch.manual_seed(0)
    model = tiny(arch, model_type=model_type, in_channels=channels)
    x = torch.randn(2, channels, 13, 19)
    out = model(x)
    assert out.shape == (2, 4, 13, 19)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    first = model.conv_units()[0].conv.weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0


def count_convs(model):
    return [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.dilation[0])
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]


@pytest.mark.parametrize("arch", GENERIC)
def test_ann_and_snn_share_one_architecture(arch):
    ann, snn = tiny(arch, model_type="ann"), tiny(arch, model_type="snn")
    assert count_convs(ann) == count_convs(snn)
    relus = sum(isinstance(m, Rectifier) for m in ann.modules())
    spiking_decoder = len(snn.decoder) - 1 if snn.fcn else 0  # the FCN decoder's sums spike, but for the last
    assert len(snn.neuron_layers()) == relus + spiking_decoder


def test_dl_vgg9_layers_match_the_paper_table():
    convs = count_convs(tiny("dl-vgg9"))
    assert convs == [
        (3, 64, 3, 1),
        (64, 64, 3, 1),
        (64, 128, 3, 1),
        (128, 128, 3, 1),
        (128, 256, 3, 1),
        (256, 256, 3, 2),
        (256, 256, 3, 2),
        (256, 1024, 3, 12),
        (1024, 4, 1, 1),
    ]
    pools = [m for m in tiny("dl-vgg9").modules() if isinstance(m, nn.AvgPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1), (3, 2, 1)]


def test_fcn_vgg9_has_four_score_maps_and_three_decoder_stages():
    model = tiny("fcn-vgg9", model_type="snn")
    scores = [m for m in model.modules() if type(m).__name__ == "SkipScore"]
    assert [s.in_channels for s in scores] == [64, 128, 256, 1024]
    assert len(model.decoder) == 3
    assert [stage.act is not None for stage in model.decoder] == [True, True, False]


def test_bntt_has_one_bn_per_timestep_with_scale_only():
    model = tiny(model_type="snn", timesteps=5)
    norm = model.conv_units()[0].norm
    assert isinstance(norm, TimeBatchNorm) and norm.weight.shape == (5, 64)
    assert not any("bias" in n for n, _ in norm.named_parameters())
    ann_norm = tiny(model_type="ann").conv_units()[0].norm
    assert ann_norm.weight is None and ann_norm.running_mean.shape == (1, 64)


def test_time_batch_norm_equals_separate_batchnorms():
    torch.manual_seed(1)
    T, N, C = 3, 4, 5
    tbn = TimeBatchNorm(C, T, affine=True)
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5)
    bns = [nn.BatchNorm2d(C, eps=1e-4, momentum=0.1) for _ in range(T)]
    for t, bn in enumerate(bns):
        bn.weight.data.copy_(tbn.weight[t])
        bn.bias = None
    x = torch.randn(T, N, C, 6, 7)  # time-major
    for training in (True, False):
        tbn.train(training)
        [bn.train(training) for bn in bns]
        out = tbn(x.flatten(0, 1), T).view(T, N, C, 6, 7)
        for t, bn in enumerate(bns):
            torch.testing.assert_close(out[t], bn(x[t]))
    for t, bn in enumerate(bns):
        torch.testing.assert_close(tbn.running_mean[t], bn.running_mean)
        torch.testing.assert_close(tbn.running_var[t], bn.running_var)


@pytest.mark.parametrize(
    "arch, full_prop, training",
    [
        ("dl-vgg9", True, True),
        ("dl-vgg9", False, False),
        ("fcn-vgg9", False, True),
        ("fcn-vgg9", True, False),
        ("dl-vgg11", False, True),
    ],
)
def test_multistep_network_equals_per_timestep_reference(arch, full_prop, training):
    torch.manual_seed(2)
    T = 3
    model = (
        build_model(
            dict(arch=arch, timesteps=T, num_classes=3, encoder="sequence", full_prop=full_prop, def_threshold=0.5)
        )
        .double()
        .train(training)
    )
    if not training:
        for norm in [u.norm for u in model.conv_units()]:
            norm.running_mean.uniform_(-0.1, 0.1)
            norm.running_var.uniform_(0.5, 1.5)
    frames = torch.randint(-1, 2, (T, 2, 3, 10, 9)).double()
    fast = model(frames)
    slow = per_timestep_forward(model, frames)
    torch.testing.assert_close(fast, slow)
    params = [p for p in model.parameters()]
    g_fast = torch.autograd.grad(fast.square().sum(), params, allow_unused=True)
    g_slow = torch.autograd.grad(slow.square().sum(), params, allow_unused=True)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in g_fast if g is not None)


def test_full_prop_runs_extra_zero_steps():
    model = tiny(model_type="snn", full_prop=True, timesteps=4)
    assert model.extra_steps == 9  # 8 spiking convs + the output conv, as in the paper's code
    model.record_spikes(True)
    model(torch.randn(1, 3, 9, 9))
    assert {s["steps"] for s in model.spike_stats()} == {13}


@pytest.mark.parametrize(
    "arch, full_prop, extra",
    [
        ("dl-vgg9", False, {}),
        ("fcn-vgg9", True, {}),
        ("dl-vgg9", False, {"conv_bias": True}),
        ("dl-vgg9", False, {"bn": False}),
    ],
)
def test_memory_saving_mode_gives_identical_outputs_gradients_and_bn_statistics(arch, full_prop, extra):
    torch.manual_seed(3)
    frames = torch.randint(-1, 2, (3, 2, 3, 10, 10)).double()
    results = []
    for saving in (False, True):
        torch.manual_seed(4)
        model = build_model(
            dict(
                arch=arch,
                timesteps=3,
                num_classes=3,
                encoder="sequence",
                full_prop=full_prop,
                def_threshold=0.5,
                memory_saving=saving,
                memory_block=2,
                **extra,
            )
        ).double()
        out = model(frames)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        results.append((out, grads, {k: v.clone() for k, v in model.state_dict().items()}))
    (out_a, grads_a, state_a), (out_b, grads_b, state_b) = results
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in grads_b)
    for key in state_a:  # BN running statistics updated once, not again by the replay
        torch.testing.assert_close(state_a[key], state_b[key], msg=key)


def test_thl_sequence_input_and_shape_error():
    model = tiny(model_type="snn", encoder="sequence", timesteps=3, in_channels=2)
    assert model(torch.randn(3, 2, 2, 11, 14)).shape == (2, 4, 11, 14)
    with pytest.raises(ValueError, match=r"\[T=3, N, C, H, W\].*\(2, 2, 2, 11, 14\)"):
        model(torch.randn(2, 2, 2, 11, 14))


def test_no_graph_outlives_a_memory_saving_training_step():
    """The replay in backward may stop early; nothing it built may stay reachable afterwards."""
    import gc

    def graphs_alive():  # tensors of earlier tests (a compiler's fake tensors) are not this step's
        gc.collect()
        return {id(o): o for o in gc.get_objects() if torch.is_tensor(o) and o.grad_fn is not None}

    before = graphs_alive()
    torch.manual_seed(5)
    model = tiny(model_type="snn", timesteps=5, memory_saving=True, memory_block=2)
    model(torch.randn(2, 3, 12, 12)).square().sum().backward()
    alive = [o for key, o in graphs_alive().items() if key not in before]
    del before
    assert alive == []


def test_poisson_encoder_rates_and_signs():
    from models.encoders import PoissonEncoder

    torch.manual_seed(5)
    x = torch.tensor([-0.8, -0.2, 0.0, 0.3, 1.0]).view(1, 5, 1, 1)
    spikes = PoissonEncoder()(x, 4000).view(4000, 5)
    torch.testing.assert_close(spikes.mean(0), x.view(5), atol=0.03, rtol=0)
    assert set(spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_same_seed_same_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = tiny(model_type="snn", encoder="poisson")
        outs.append(model(torch.rand(2, 3, 16, 16) - 0.5))
    assert torch.equal(*outs)


def test_spike_recording_counts_match_hooks_and_cost_nothing_when_off():
    torch.manual_seed(8)
    model = tiny(model_type="snn", timesteps=3)
    seen = {}
    for lif in model.neuron_layers():
        lif.register_forward_hook(lambda m, inp, out: seen.__setitem__(m.name, out.abs().sum().item()))
    model(torch.randn(2, 3, 8, 8))
    assert all(s["images"] == 0 for s in model.spike_stats())
    model.record_spikes(True)
    model(torch.randn(2, 3, 8, 8))
    stats = model.spike_stats()
    assert [s["name"] for s in stats][:3] == ["body.0", "body.1", "body.3"]
    for s in stats:
        assert s["spikes"] == seen[s["name"]] and s["images"] == 2
    assert stats[0]["neurons"] == 64 * 8 * 8


def test_bad_arguments_name_value_and_choices():
    for key, value, choices in [
        ("arch", "resnet50", "dl-vgg9"),
        ("surrogate", "tanh", "linear"),
        ("encoder", "rate", "poisson"),
        ("model_type", "cnn", "snn"),
    ]:
        with pytest.raises(ValueError, match=f"unknown {key} '{value}'.*{choices}"):
            build_model({key: value})


def test_non_positive_sizes_are_refused():
    with pytest.raises(ValueError, match="'memory_block' must be a positive integer, got 0"):
        build_model({"memory_block": 0})
    with pytest.raises(ValueError, match="'timesteps' must be a positive integer"):
        build_model({"timesteps": 0})


def test_defaults_are_the_paper_codes():
    assert MODEL_DEFAULTS["timesteps"] == 20 and MODEL_DEFAULTS["leak_mem"] == 0.99
    assert MODEL_DEFAULTS["def_threshold"] == 1.0 and MODEL_DEFAULTS["surrogate"] == "linear"


def test_xavier_init_gain_two():
    weight = tiny().conv_units()[1].conv.weight  # 64 -> 64, 3x3
    bound = 2 * (6 / (64 * 9 + 64 * 9)) ** 0.5
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound


def test_pretrained_vgg_weights_from_local_file(tmp_path):
    vgg = torchvision.models.vgg11(weights=None)
    path = tmp_path / "vgg11.pth"
    torch.save(vgg.state_dict(), path)
    model = build_model(dict(arch="dl-vgg11", timesteps=2, num_classes=4, pretrained=str(path)))
    vgg_convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    units = [u for u in model.conv_units()]
    for unit, conv in zip(units[:6], vgg_convs):
        assert torch.equal(unit.conv.weight, conv.weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(dict(arch="dl-vgg11", pretrained=str(tmp_path / "missing.pth")))


def test_converted_style_thresholds_load_from_state_dict():
    model = tiny(model_type="snn")
    model.neuron_layers()[0].set_threshold(torch.rand(64, 1, 1) + 0.5)
    other = tiny(model_type="snn")
    other.load_state_dict(model.state_dict())
    assert other.neuron_layers()[0].threshold.shape == (64, 1, 1)
    assert isinstance(other.conv_units()[0], ConvUnit)


def test_bf16_autocast_keeps_the_membrane_in_float32():
    from models.neurons import lif_sequence

    torch.manual_seed(9)
    currents = (torch.rand(12, 3, 7) * 0.9).bfloat16()
    # The membrane integrates the bf16 currents in float32: the same spikes as from their float32 copy.
    assert torch.equal(lif_sequence(currents, 0.99, 1.0).float(), lif_sequence(currents.float(), 0.99, 1.0))
    model = tiny(model_type="snn", timesteps=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 12, 12))
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ["dl-vgg9", "fcn-vgg9"])
def test_bf16_autocast_fires_like_float32_and_trains(arch):
    """--amp: convolutions in bf16, neurons in float32; training follows the float32 run. (Outputs of one
    forward cannot be compared: an SNN at initialisation is chaotic, a 1e-4 relative input change already
    moves its logits by ~50%.)"""
    torch.manual_seed(6)
    model = tiny(arch, model_type="snn", timesteps=3)
    x, labels = torch.rand(2, 3, 16, 16) - 0.5, torch.randint(0, 4, (2, 16, 16))
    inputs = model.encoder(x, 3)  # direct encoding: the analog image at every timestep
    model.clock.set(3)  # a unit called on its own runs the block of timesteps the clock says
    with torch.no_grad():
        exact = model.body[0](inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.body[0](inputs)
    assert (exact != mixed).float().mean() < 5e-3  # only currents within bf16 rounding of theta flip
    state = {k: v.clone() for k, v in model.state_dict().items()}
    final = {}
    for amp in (False, True):  # the same 15 Adam steps from the same start, with and without autocast
        model.load_state_dict(state)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(15):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = nn.functional.cross_entropy(model(x).float(), labels)
            if step == 0:
                first = loss.item()
            optimizer.zero_grad()
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            optimizer.step()
        final[amp] = loss.item()
        assert final[amp] < 0.9 * first
    assert final[True] == pytest.approx(final[False], rel=0.05)
    model.eval()  # inference (BN with running statistics) under autocast too
    model.clock.set(3)
    with torch.no_grad():
        exact = model.body[0](inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.body[0](inputs)
            assert torch.isfinite(model(x).float()).all()
    assert (exact != mixed).float().mean() < 5e-3


def test_memory_saving_under_autocast_keeps_the_convolution_outputs_instead(monkeypatch):
    """Backward would not replay autocast, so memory-saving mode does not recompute convolutions under it."""
    import models.neurons as neurons

    torch.manual_seed(11)
    model = tiny(model_type="snn", timesteps=4, memory_saving=True, memory_block=2)
    used, original = [], neurons._SpikingLayer.apply
    monkeypatch.setattr(
        neurons._SpikingLayer, "apply", lambda *args: (args[-1].conv is not None and used.append(1)) or original(*args)
    )
    for amp in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(torch.randn(2, 3, 12, 12))
        out.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert bool(used) == (not amp)


def test_memory_saving_mode_with_poisson_spikes_gives_identical_gradients():
    """Poisson input is tagged as spikes: the replay must store it as the first pass did (one byte)."""
    results = []
    for saving in (False, True):
        torch.manual_seed(5)
        model = build_model(
            dict(
                arch="dl-vgg9",
                timesteps=4,
                num_classes=3,
                encoder="poisson",
                def_threshold=0.5,
                memory_saving=saving,
                memory_block=2,
            )
        ).double()
        out = model(torch.rand(2, 3, 12, 12, dtype=torch.float64) * 2 - 1)
        results.append((out, torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)
