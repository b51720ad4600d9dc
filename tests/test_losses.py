"""The published training losses (utils/losses.py) against hand computations and against the authors' own loss
code (tests/reference/published/losses.json: SLTNet's ProbOhemCrossEntropy2d, Spike-BRGNet's FullModel with
OhemCrossEntropy, run on seeded logits); the training keys that select them; the StepLR schedule."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import setup
import train
from tests.published_seeds import seeded_input, seeded_labels
from utils.losses import SegmentationLoss, mean_over_all_pixels, ohem_cross_entropy

LOSSES = json.loads((Path(__file__).resolve().parent / "reference" / "published" / "losses.json").read_text())

# One image of 1x4 pixels, 3 classes: class probabilities of the target p = e^2/(e^2+2), 1/3, e/(e+2); the
# last pixel is ignored.
LOGITS = torch.tensor([[2.0, 0.0, 0.0, 5.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
LOGITS = LOGITS.view(1, 3, 1, 4)
TARGET = torch.tensor([[[0, 1, 1, 255]]])
P = [math.exp(2) / (math.exp(2) + 2), 1 / 3, math.e / (math.e + 2)]


def nll(p):
    return -math.log(p)


@pytest.mark.parametrize(
    "thresh, min_kept, kept",
    [
        (0.7, 1, [1, 2]),  # sorted p: 1/3, 0.576, 0.787; p[1] = 0.576 < 0.7: the threshold is 0.7
        (0.7, 2, [1, 2]),  # p[2] = 0.787 > 0.7 is the threshold; kept strictly below it
        (0.5, 0, [1]),  # p[0] = 1/3 < 0.5: the threshold 0.5 keeps one pixel
        (0.9, 100, [0, 1, 2]),  # min_kept beyond the pixels: the largest p is the bound, 0.9 above it
    ],
)
def test_ohem_keeps_the_pixels_below_the_threshold(thresh, min_kept, kept):
    loss = ohem_cross_entropy(LOGITS, TARGET, thresh, min_kept)
    assert float(loss) == pytest.approx(sum(nll(P[i]) for i in kept) / len(kept), rel=1e-12)


def test_aux_and_boundary_terms_by_hand():
    aux = torch.tensor([[[[0.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]]], dtype=torch.float64)
    boundary = torch.tensor([[[[3.0, -3.0, 3.0, 3.0]]]], dtype=torch.float64, requires_grad=True)
    # aux: cross-entropy summed over the 3 labelled pixels, divided by all 4
    p_aux = [1 / (2 + math.e), 1 / (2 + math.e), 1 / 3]
    assert float(mean_over_all_pixels(aux, TARGET)) == pytest.approx(sum(map(nll, p_aux)) / 4, rel=1e-12)
    # boundary: sigmoid > 0.6 marks pixels 0, 2 (and the ignored 3): OHEM over p = 0.787, 0.576 keeps 0.576
    loss = SegmentationLoss("ohem", 0.7, 1, aux_weight=0.4, boundary_weight=1.0, boundary_thresh=0.6)
    logits = LOGITS.clone().requires_grad_()
    total = loss({"out": logits, "aux": aux, "boundary": boundary}, TARGET)
    expected = (nll(P[1]) + nll(P[2])) / 2 + 0.4 * sum(map(nll, p_aux)) / 4 + nll(P[2])
    assert float(total.detach()) == pytest.approx(expected, rel=1e-12) and loss.heads
    total.backward()
    assert boundary.grad is None and logits.grad.abs().sum() > 0  # the boundary test is not differentiable


def test_no_pixel_left_is_zero_not_an_error():
    ignored = torch.full_like(TARGET, 255)
    logits = LOGITS.clone().requires_grad_()
    for loss in (SegmentationLoss("ohem"), SegmentationLoss("ce")):
        value = loss(logits, ignored)
        assert float(value.detach()) == 0.0 and value.requires_grad
    boundary = torch.full((1, 1, 1, 4), -9.0, dtype=torch.float64)  # no pixel marked
    value = SegmentationLoss("ohem", 0.7, 1, boundary_weight=1.0)({"out": logits, "boundary": boundary}, TARGET)
    assert float(value.detach()) == pytest.approx((nll(P[1]) + nll(P[2])) / 2, rel=1e-12)


def test_equal_to_sltnet_prob_ohem_cross_entropy():
    reference = LOSSES["sltnet_ProbOhemCrossEntropy2d_thresh0.7_balance[1.0,0.4]"]
    main, early = 2.0 * seeded_input((2, 6, 16, 24), 21), 2.0 * seeded_input((2, 6, 16, 24), 22)
    y = seeded_labels((2, 16, 24), 6, 23)
    assert int((y != 255).sum()) == reference["valid_pixels"]
    for min_kept in (50, 300, 100000):
        expected = reference[f"min_kept={min_kept}"]
        loss = SegmentationLoss("ohem", 0.7, min_kept, aux_weight=0.4)
        assert float(loss({"out": main, "aux": early}, y)) == pytest.approx(expected["total"], rel=1e-12)
        assert float(ohem_cross_entropy(main, y, 0.7, min_kept)) == pytest.approx(expected["ohem_main"], rel=1e-12)


def test_equal_to_spike_brgnet_full_model():
    reference = LOSSES["brgnet_FullModel_DDD17_yaml"]
    config = reference["config"]
    assert (config["OHEMTHRES"], config["BALANCE_WEIGHTS"], config["SB_WEIGHTS"]) == (0.9, [0.4, 1.0], 1.0)
    heads = {
        name: F.interpolate(2.0 * seeded_input(shape, seed), size=(64, 96), mode="bilinear", align_corners=True)
        for name, shape, seed in (
            ("aux", (2, 6, 8, 12), 31),
            ("out", (2, 6, 8, 12), 32),
            ("boundary", (2, 1, 8, 12), 33),
        )
    }  # our model resizes its heads to the input as their FullModel does: bilinear, align_corners=True
    y = seeded_labels((2, 64, 96), 6, 34)
    for min_kept in (131072, 1000):
        loss = SegmentationLoss("ohem", 0.9, min_kept, aux_weight=0.4, boundary_weight=1.0, boundary_thresh=0.6)
        expected = reference[f"FullModel_min_kept={min_kept}"]["loss"]
        assert float(loss(heads, y)) == pytest.approx(expected, rel=1e-12)
        ohem = reference[f"ohem_only_main_upsampled_min_kept={min_kept}"]
        assert float(ohem_cross_entropy(heads["out"], y, 0.9, min_kept)) == pytest.approx(ohem, rel=1e-12)


def resolve(flags):
    return setup.resolve_config(train.get_args_parser().parse_args(["--dataset", "synthetic", *flags]))


def test_loss_keys_build_the_loss_and_refuse_what_they_would_ignore():
    cfg = resolve(["--loss", "ohem", "--ohem_thresh", "0.8", "--ohem_min_kept", "7"])
    loss = setup.build_loss(cfg)
    assert (loss.loss, loss.ohem_thresh, loss.ohem_min_kept, loss.heads) == ("ohem", 0.8, 7, False)
    assert isinstance(setup.build_loss(), torch.nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="ohem_thresh.*applies to loss ohem only"):
        resolve(["--ohem_thresh", "0.8"])
    with pytest.raises(ValueError, match="boundary_weight.*boundary head.*spike-brgnet"):
        resolve(["--boundary_weight", "1"])
    with pytest.raises(ValueError, match="lr_gamma.*applies to scheduler steplr only"):
        resolve(["--lr_gamma", "0.5"])


def test_steplr_schedule_and_plain_adam():
    cfg = {"epochs": 30, "scheduler": "steplr", "lr_step": 5, "lr_gamma": 0.92}
    assert [setup.lr_factor(e, cfg) for e in (0, 4, 5, 9, 10, 29)] == [1, 1, 0.92, 0.92, 0.92**2, 0.92**5]
    model = torch.nn.Conv2d(1, 1, 1)
    adam = setup.build_optimizer({"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "amsgrad": False}, model)
    assert adam.defaults["amsgrad"] is False and adam.defaults["weight_decay"] == 1e-4
