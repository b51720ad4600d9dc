"""Embedded datasets and the registry: determinism, layout, and that colour alone does not solve them."""

import numpy as np
import pytest
import torch

import data
from data.synthetic import SyntheticEvents, SyntheticShapes, shape_masks
from data.transforms import MEAN_BGR


def miou(pred, target, num_classes):
    cm = np.bincount(target.ravel() * num_classes + pred.ravel(), minlength=num_classes**2)
    cm = cm.reshape(num_classes, num_classes).astype(float)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = union > 0
    return (np.diag(cm)[present] / union[present]).mean()


def to_rgb(x):
    """Undo the VOC normalisation by hand: [3, H, W] BGR-normalised -> [H, W, 3] RGB 0-255."""
    bgr = x.numpy() * 255.0 + np.array(MEAN_BGR)[:, None, None]
    return bgr[::-1].transpose(1, 2, 0)


def stack(ds, n):
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def test_synthetic_items_are_deterministic_and_split_dependent():
    a, b = SyntheticShapes("train", 10, seed=3), SyntheticShapes("train", 10, seed=3)
    xa, ya = a[4]
    xb, yb = b[4]
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, SyntheticShapes("train", 10, seed=4)[4][0])
    assert not torch.equal(xa, SyntheticShapes("val", 10, seed=3)[4][0])
    assert xa.dtype == torch.float32 and xa.shape == (3, 48, 48)
    assert ya.dtype == torch.int64 and ya.shape == (48, 48)


def test_synthetic_layout_classes_and_range():
    ds = SyntheticShapes("train", 60, img_size=[40, 56])
    x, y = stack(ds, 60)
    assert x.shape == (60, 3, 40, 56) and y.shape == (60, 40, 56)
    counts = torch.bincount(y.flatten(), minlength=4)
    assert len(counts) == 4 and (counts > 0).all()  # every class appears, nothing beyond 3
    assert 0.1 < (y > 0).float().mean() < 0.5  # objects are large
    rgb = to_rgb(x.permute(1, 0, 2, 3).reshape(3, -1, 56))  # values come from a 0-255 image
    assert rgb.min() >= -1e-3 and rgb.max() <= 255 + 1e-3
    assert -0.5 < x.min() < -0.3 and 0.4 < x.max() < 0.6


def test_shapes_have_equal_area():
    yy, xx = np.mgrid[0:400, 0:400].astype(np.float32)
    disc_area = np.pi * 100.0**2
    for kind in (1, 2, 3):
        area = shape_masks(kind, 200.0, 200.0, 100.0, 0.3, yy, xx).sum()
        assert abs(area - disc_area) / disc_area < 0.01, kind


def _fit_colour_rules(x, y, num_classes):
    pixels = to_rgb(x.permute(1, 0, 2, 3).reshape(3, -1, x.shape[-1])).reshape(-1, 3)
    labels = y.numpy().ravel()
    means = np.stack([pixels[labels == c].mean(0) for c in range(num_classes)])
    bins = np.clip(pixels // 32, 0, 7).astype(int) @ np.array([64, 8, 1])
    joint = np.zeros((512, num_classes))
    np.add.at(joint, (bins, labels), 1)
    return means, joint.argmax(1)  # nearest class mean; best class per colour cell (MAP rule)


def test_pixel_colour_rules_do_not_solve_synthetic():
    train, val = SyntheticShapes("train", 200), SyntheticShapes("val", 100)
    xt, yt = stack(train, 200)
    xv, yv = stack(val, 100)
    means, cell_class = _fit_colour_rules(xt, yt, 4)
    pixels = to_rgb(xv.permute(1, 0, 2, 3).reshape(3, -1, 48)).reshape(-1, 3)
    nearest = ((pixels[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    cells = np.clip(pixels // 32, 0, 7).astype(int) @ np.array([64, 8, 1])
    assert miou(nearest, yv.numpy().ravel(), 4) < 0.35
    assert miou(cell_class[cells], yv.numpy().ravel(), 4) < 0.35


def test_events_layout_and_scaling():
    ds = SyntheticEvents("train", num_samples=2, channels=(0, 1, 2, 3, 4, 5))
    raw, label = ds.frames(0, 3, 3)
    counts, stamps = raw[0, :2], raw[0, 2:]
    assert np.array_equal(counts, np.floor(counts)) and counts.min() >= 0
    assert stamps.min() >= 0 and stamps[[0, 2]].max() <= 1
    # no events -> mean timestamp 0 and std 0
    assert (stamps[0][counts[0] == 0] == 0).all() and (stamps[1][counts[0] == 0] == 0).all()
    fired = counts.sum(0) > 0
    assert fired[label > 0].mean() > 3 * fired[label == 0].mean()  # moving objects make the events
    x, y = ds[3]
    assert x.shape == (6, 48, 48) and torch.equal(y, torch.from_numpy(label))
    expected = [(c - c.min()) / (c.max() - c.min()) - 0.5 if c.max() > c.min() else np.zeros_like(c) for c in raw[0]]
    assert torch.allclose(x, torch.from_numpy(np.stack(expected)), atol=1e-6)


def test_events_thl_windows_match_single_frames():
    single = SyntheticEvents("val", num_samples=2, seq_len=12)
    thl = SyntheticEvents("val", num_samples=2, seq_len=12, thl=True, timesteps=5)
    assert len(single) == 24 and len(thl) == 2 * (12 - 5 + 1)
    x, y = thl[8 + 2]  # sequence 1, target frame 2 + 4 = 6
    assert x.shape == (5, 2, 48, 48)
    for t in range(5):  # frame t of the window is frame 2 + t of the sequence
        assert torch.allclose(x[t], single[12 + 2 + t][0], atol=1e-6)
    assert torch.equal(y, single[12 + 6][1])
    with pytest.raises(ValueError, match="exceeds the sequence length"):
        SyntheticEvents("train", thl=True, timesteps=30, seq_len=20)


def test_registry_build_and_info():
    cfg = dict(dataset="synthetic", img_size=32, num_train=7, num_val=3, seed=1)
    train, val = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "val")
    assert len(train) == 7 and len(val) == 3 and train[0][0].shape == (3, 32, 32)
    info = data.dataset_info("synthetic")
    assert info["num_classes"] == 4 and info["in_channels"] == 3 and info["ignore_index"] == 255
    assert len(info["palette"]) == len(info["class_names"]) == 4
    ev_cfg = dict(dataset="synthetic-events", channels=[0, 1, 3], thl=True, timesteps=4, num_train=2, img_size=32)
    assert data.dataset_info("synthetic-events", ev_cfg)["in_channels"] == 3
    assert data.build_dataset(ev_cfg, "train")[0][0].shape == (4, 3, 32, 32)
    assert data.dataset_info("ddd17")["in_channels"] == 2 and data.dataset_info("ddd17")["num_classes"] == 6
    assert data.dataset_info("voc2012")["num_classes"] == 21
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*synthetic"):
        data.build_dataset(dict(dataset="nope"), "train")
    with pytest.raises(ValueError, match="split must be"):
        data.build_dataset(cfg, "test")
    with pytest.raises(ValueError, match="needs data_root"):
        data.build_dataset(dict(dataset="voc2012"), "train")
    with pytest.raises(ValueError, match="event channels"):
        data.build_dataset(dict(dataset="synthetic-events", channels=[0, 6]), "train")
