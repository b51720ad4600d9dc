"""The training run's last word: a picture of validation images (input | ground truth | prediction | one
layer's activity) in the run folder, its path printed as the last line; and the loss read back from the
device once per window of steps, a non-finite loss still stopping the run with its batch named."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import train
from common.cli import TrainingStopped
from data.palettes import SYNTHETIC_PALETTE
from data.synthetic import SyntheticShapes
from tests.conftest import TINY_ARGS
from utils import plots

SIZE, ROWS, COLUMNS, GAP = 16, 4, 4, 2  # TINY_ARGS: 16x16 images, 8 val images (4 drawn), seed 3


@pytest.mark.parametrize("model_type", ["snn", "ann"])
def test_run_ends_with_a_picture_whose_truth_column_is_the_labels_in_the_palette(model_type, tmp_path, capsys):
    args = [*TINY_ARGS, "--model_type", model_type, "--epochs", "1", "--model_dir", str(tmp_path), "--name", "run"]
    train.main(args)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    path = tmp_path / "run" / "predictions.png"
    assert last_line == str(path.resolve())

    with Image.open(path) as image:
        image.load()
        picture = np.asarray(image.convert("RGB"))
    factor = plots.upscale_factor(SIZE)
    width = (COLUMNS * SIZE + (COLUMNS - 1) * GAP) * factor
    height = ROWS * (SIZE + GAP) * factor + plots.HEADER_HEIGHT
    assert picture.shape == (height, width, 3)

    # The ground-truth column, read at the centre of each enlarged pixel, is the label of that validation
    # image (generated here afresh) in the synthetic palette.
    val = SyntheticShapes("val", num_samples=8, img_size=SIZE, seed=3)
    palette = np.array(SYNTHETIC_PALETTE, dtype=np.uint8)
    centres = np.arange(SIZE) * factor + factor // 2
    for row in range(ROWS):
        _, label = val.generate(row)
        top = plots.HEADER_HEIGHT + row * (SIZE + GAP) * factor
        left = (SIZE + GAP) * factor
        panel = picture[top + centres][:, left + centres]
        assert np.array_equal(panel, palette[label]), f"row {row}: the truth panel is not the label's colours"
        assert len(np.unique(label)) > 1  # a label with an object, so the check sees more than one colour


def test_activity_is_the_layers_mean_output_over_time_and_channels():
    """layer_activity against the first spiking layer computed by hand: its spikes, averaged over T and channels."""
    from models import build_model

    torch.manual_seed(0)
    model = build_model(dict(arch="dl-vgg9", timesteps=3, num_classes=4, encoder="direct", def_threshold=0.3)).eval()
    images = torch.rand(2, 3, 12, 12) - 0.5
    name, predictions, activity = plots.layer_activity(model, images, {"dataset": "synthetic"}, "cpu")
    assert name == "body.1" and predictions.shape == (2, 12, 12)
    # By hand: conv -> BN (eval, per timestep) -> LIF (leak 0.99, threshold 0.3, reset by subtraction), twice.
    x = images
    units = model.conv_units()[:2]
    seq = [x] * 3
    for unit in units:
        w = unit.conv.weight
        u, out = torch.zeros(()), []
        for t, xt in enumerate(seq):
            bn = unit.norm
            c = torch.nn.functional.conv2d(xt, w, padding=1)
            c = (c - bn.running_mean[t][:, None, None]) / torch.sqrt(bn.running_var[t][:, None, None] + 1e-4)
            c = c * bn.weight[t][:, None, None]
            u = 0.99 * u + c
            s = (u > 0.3).float()
            u = u - 0.3 * s
            out.append(s)
        seq = out
    expected = torch.stack(seq).mean(dim=(0, 2))
    assert activity.shape == (2, 12, 12)
    torch.testing.assert_close(activity, expected)
    assert 0 < float(activity.mean()) < 1  # some neurons fire, not all


def test_loss_window_reads_back_once_per_window_and_names_a_non_finite_batch(monkeypatch):
    monkeypatch.setattr(train, "LOSS_READ_EVERY", 3)
    reads = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda tensors, *a, **k: reads.append(len(tensors)) or real_stack(tensors))
    window = train.LossWindow(epoch=1)
    values = [0.5, 0.25, 1.0, 2.0]
    assert [window.add(torch.tensor(v)) for v in values] == [False, False, True, False]
    assert reads == [3] and window.mean == pytest.approx(sum(values[:3]) / 3)
    window.read()  # the end of the epoch reads the rest
    assert reads == [3, 1] and window.count == 4 and window.mean == pytest.approx(sum(values) / 4)

    window = train.LossWindow(epoch=4)
    for v in (0.5, 0.5, 0.5, 0.5, math.inf):
        window.add(torch.tensor(v))
    with pytest.raises(TrainingStopped, match="became inf at epoch 5, batch 5"):
        window.read()
