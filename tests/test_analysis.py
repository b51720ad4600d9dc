"""utils/analysis.py and utils/plots.py: firing rates, pictures, and the analysis step through test.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import models
import setup
import test as test_script
import train
from tests.conftest import TINY_ARGS
from utils import analysis, plots
from utils.checkpoint import FORMAT, save_checkpoint
from utils.energy import PJ_TO_MJ


def tiny_snn(encoder="direct", threshold=0.05):
    cfg = dict(
        models.MODEL_DEFAULTS,
        model_type="snn",
        arch="dl-vgg9",
        num_classes=4,
        img_size=[16, 16],
        timesteps=3,
        encoder=encoder,
        def_threshold=threshold,
    )
    return models.build_model(cfg).eval()


def batches(*inputs):
    return [(x, torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.long)) for x in inputs]


def test_firing_rates_are_bounded_and_match_a_count_of_the_spikes():
    torch.manual_seed(0)
    model = tiny_snn()
    outputs = []
    hooks = [lif.register_forward_hook(lambda m, i, o: outputs.append(o)) for lif in model.neuron_layers()]
    loader = batches(torch.rand(2, 3, 16, 16) - 0.5, torch.rand(1, 3, 16, 16) - 0.5)
    rows, _, input_size, images = analysis.measure_activity(model, loader, {}, "cpu", count_ops=False)
    for hook in hooks:
        hook.remove()
    assert images == 3 and input_size == [3, 16, 16]
    layers = len(rows)
    for index, row in enumerate(rows):
        spikes = sum(float(outputs[index + k * layers].abs().sum()) for k in range(2))  # two batches
        neurons = outputs[index][0].numel()
        assert row["neurons"] == neurons and row["steps"] == 3
        assert row["spikes_per_image"] == pytest.approx(spikes / 3)
        assert row["rate"] == pytest.approx(spikes / 3 / neurons / 3)
        assert 0 <= row["rate"] <= 1
    assert rows[0]["rate"] > 0
    totals = analysis.spike_totals(rows)
    assert totals["rate"] == pytest.approx(
        sum(r["spikes_per_image"] for r in rows) / sum(r["neurons"] * 3 for r in rows)
    )


def test_all_zero_input_gives_no_spikes_and_no_sops():
    model = tiny_snn("direct")  # fresh BN: zero mean, unit variance, no shift -> zero current
    rows, counter, _, _ = analysis.measure_activity(model, batches(torch.zeros(2, 3, 16, 16)), {}, "cpu")
    assert rows and all(row["rate"] == 0 and row["spikes_per_image"] == 0 for row in rows)
    summary = counter.summary()
    assert summary["sops"] == 0 and summary["macs"] == 0  # an all-zero analog frame needs no work either
    assert summary["energy_mj"] == 0


def test_energy_combines_macs_and_sops_with_the_given_constants():
    torch.manual_seed(1)
    model = tiny_snn("direct")
    _, counter, _, _ = analysis.measure_activity(
        model, batches(torch.rand(2, 3, 16, 16) - 0.5), {}, "cpu", count_spikes=False
    )
    summary = counter.summary(mac_pj=2.0, ac_pj=0.5)
    assert summary["macs"] > 0 and summary["sops"] > 0
    assert summary["energy_mj"] == pytest.approx((summary["macs"] * 2.0 + summary["sops"] * 0.5) * PJ_TO_MJ)


def test_parse_factors():
    assert analysis.parse_factors("0, 0.1,0.5") == [0.0, 0.1, 0.5]
    for bad in ("", "a,b", "-1"):
        with pytest.raises(ValueError, match="atk_factor"):
            analysis.parse_factors(bad)


def test_prediction_grid_is_a_png_of_the_expected_size_and_colours(tmp_path):
    from data.palettes import SYNTHETIC_PALETTE

    x = torch.rand(3, 16, 20) - 0.5
    prediction = torch.zeros(16, 20, dtype=torch.long)
    prediction[:, 10:] = 2
    target = torch.full((16, 20), 1, dtype=torch.long)
    target[0, 0] = 255
    path = plots.save_prediction_grid([(x, prediction, target)] * 3, tmp_path / "grid.png", "synthetic")
    factor = plots.upscale_factor(16)
    assert factor == 8
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        # three rows (2-pixel gaps below each) of input | ground truth | prediction (2-pixel gaps between)
        assert image.size == ((3 * 20 + 2 * 2) * factor, 3 * (16 + 2) * factor)
        pixels = np.asarray(image)
    truth, pred = 22 * factor, 44 * factor  # x offsets of the panels
    assert tuple(pixels[0, truth]) == (255, 255, 255)  # ignored pixel
    assert tuple(pixels[8, truth + 8]) == SYNTHETIC_PALETTE[1]
    assert (
        tuple(pixels[0, pred]) == SYNTHETIC_PALETTE[0] and tuple(pixels[0, pred + 10 * factor]) == SYNTHETIC_PALETTE[2]
    )
    row2 = 18 * factor
    assert tuple(pixels[row2, pred + 10 * factor]) == SYNTHETIC_PALETTE[2]


def test_event_inputs_show_positive_and_negative_events(tmp_path):
    x = torch.full((2, 8, 8), -0.5)
    x[0, :4] = 0.5  # positive events in the top half
    x[1, 4:] = 0.5  # negative events in the bottom half
    label = torch.zeros(8, 8, dtype=torch.long)
    path = plots.save_prediction_grid([(x, label, label)], tmp_path / "events.png", "synthetic-events")
    factor = plots.upscale_factor(8)
    with Image.open(path) as image:
        assert image.size == ((3 * 8 + 2 * 2) * factor, (8 + 2) * factor)
        pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[7 * factor, 0]) == (0, 0, 255)


class RecordingModel(torch.nn.Module):
    """Predicts class 0 everywhere and keeps every input it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 4, *x.shape[-2:])


def evaluated_inputs(images, kind, factor, batch_size):
    from utils.evaluation import evaluate

    model = RecordingModel()
    loader = batches(*images.split(batch_size))
    evaluate(
        model,
        loader,
        {"num_classes": 4},
        "cpu",
        show_bar=False,
        input_transform=analysis.CorruptInputs(kind, factor, "synthetic", seed=5),
    )
    return torch.cat(model.seen)


def grey_images(count=4, size=32):
    from data.transforms import normalize_image

    torch.manual_seed(3)
    return normalize_image(100 + 50 * torch.rand(count, 3, size, size))  # far from 0 and 255: no clipping


@pytest.mark.parametrize("kind", analysis.ATTACKS)
def test_factor_zero_leaves_the_evaluated_inputs_unchanged(kind):
    images = grey_images()
    assert torch.equal(evaluated_inputs(images, kind, 0.0, batch_size=3), images)


def test_evaluated_inputs_carry_the_requested_noise_and_do_not_depend_on_the_batch_size():
    from data.transforms import denormalize_image

    images = grey_images()
    noisy = evaluated_inputs(images, "gaussiannoise", 10.0, batch_size=3)
    difference = denormalize_image(noisy) - denormalize_image(images)  # on the 0-255 scale
    assert difference.mean().abs() < 0.5 and difference.std() == pytest.approx(10.0, rel=0.05)
    assert torch.equal(evaluated_inputs(images, "gaussiannoise", 10.0, batch_size=1), noisy)
    per_image = [difference[i].flatten() for i in range(len(images))]
    assert not torch.allclose(per_image[0], per_image[1])  # each image gets its own noise


def test_evaluated_inputs_carry_salt_and_pepper_and_blur():
    from data.transforms import denormalize_image

    images = grey_images()
    salted = denormalize_image(evaluated_inputs(images, "saltpepper", 0.2, batch_size=2))
    extreme = ((salted.round() == 0) | (salted.round() == 255)).all(dim=1)
    assert extreme.float().mean() == pytest.approx(0.2, abs=0.03)
    blurred = evaluated_inputs(images, "gaussianblur", 1.5, batch_size=2)
    assert blurred.var() < 0.5 * images.var()  # smoothing removes most of the pixel noise


def make_checkpoint(path, *extra):
    args = train.get_args_parser().parse_args([*TINY_ARGS, *extra])
    cfg = setup.resolve_config(args)
    torch.manual_seed(0)
    model = setup.build_model(cfg)
    save_checkpoint(
        path,
        {
            "format": FORMAT,
            "config": cfg,
            "state_dict": model.state_dict(),
            "optimizer": {},
            "scheduler": {},
            "epoch": 0,
            "best_miou": 0.0,
        },
    )
    return path


def test_test_py_writes_spikes_energy_comparison_plots_and_pictures(tmp_path, capsys):
    snn = make_checkpoint(tmp_path / "snn.pth", "--model_type", "snn", "--def_threshold", "0.05")
    ann = make_checkpoint(tmp_path / "ann.pth", "--model_type", "ann")
    results_path = tmp_path / "results.json"
    test_script.main(
        [
            "--model_path",
            str(snn),
            "--results",
            str(results_path),
            "--count_spikes",
            "--energy",
            "--compare",
            str(ann),
            "--plot",
            "--plot_dir",
            str(tmp_path / "plots"),
            "--save_predictions",
            str(tmp_path / "pictures"),
            "--num_pictures",
            "3",
        ]
    )
    results = json.loads(results_path.read_text())
    assert [row["name"] for row in results["spikes"]][:2] == ["body.0", "body.1"]
    assert all(set(row) >= {"name", "neurons", "spikes_per_image", "rate"} for row in results["spikes"])
    assert all(0 <= row["rate"] <= 1 for row in results["spikes"])
    energy = results["energy"]
    assert energy["input_size"] == [3, 16, 16] and energy["images"] == 8
    assert energy["sops"] > 0 and energy["energy_mj"] > 0 and len(energy["per_layer"]) == 9
    compare = results["compare"]
    assert compare["model_type"] == "ann" and compare["energy"]["sops"] == 0
    assert compare["energy_ratio"] == pytest.approx(compare["energy"]["energy_mj"] / energy["energy_mj"])
    assert 0 <= compare["miou"] <= 1
    with Image.open(tmp_path / "pictures" / "predictions.png") as image:
        assert image.size == ((3 * 16 + 4) * 8, 3 * (16 + 2) * 8)
    assert (tmp_path / "plots" / "firing_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "energy ratio ann / snn" in out and "body.0" in out


def test_test_py_attack_sweep_has_one_entry_per_factor_and_factor_zero_is_clean(tmp_path):
    ann = make_checkpoint(tmp_path / "ann.pth", "--model_type", "ann")
    results_path = tmp_path / "results.json"
    test_script.main(
        [
            "--model_path",
            str(ann),
            "--results",
            str(results_path),
            "--attack",
            "saltpepper",
            "--atk_factor",
            "0,0.5",
            "--plot",
            "--plot_dir",
            str(tmp_path / "plots"),
            "--save_predictions",
            str(tmp_path / "pictures"),
            "--num_pictures",
            "2",
        ]
    )
    results = json.loads(results_path.read_text())
    rows = results["robustness"]
    assert [(row["attack"], row["factor"]) for row in rows] == [("saltpepper", 0.0), ("saltpepper", 0.5)]
    assert rows[0]["miou"] == results["miou"]  # the ANN is deterministic: factor 0 is the clean evaluation
    assert rows[1]["pixel_acc"] != rows[0]["pixel_acc"]
    assert (tmp_path / "plots" / "robustness_saltpepper.png").is_file()
    names = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert names == ["predictions.png", "predictions_saltpepper_0.5.png", "predictions_saltpepper_0.png"]


def test_bad_energy_constant_is_a_clear_error(tmp_path):
    snn = make_checkpoint(tmp_path / "snn.pth", "--model_type", "snn")
    with pytest.raises(ValueError, match="--ac_energy_pj must be >= 0"):
        test_script.main(["--model_path", str(snn), "--energy", "--ac_energy_pj", "-1"])
