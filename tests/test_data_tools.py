"""Transforms, corruptions, datalists and visualisation."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import datalists, visualize
from data.corruptions import apply_corruption
from data.palettes import SYNTHETIC_PALETTE, VOC_PALETTE
from data.synthetic import SyntheticShapes
from data.transforms import MEAN_BGR, ddd17_transform, normalize_image, parse_size, voc_transform

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "voc2012-mini"


def rgb_by_hand(x):
    """[..., 3, H, W] normalised -> RGB 0-255 (hand inverse of the BGR / mean / 255 normalisation)."""
    bgr = x.double() * 255 + torch.tensor(MEAN_BGR, dtype=torch.float64).view(3, 1, 1)
    return bgr.flip(-3)


def grey_image(size=200, value=128.0):
    return normalize_image(torch.full((3, size, size), value))


# ---------------------------------------------------------------- corruptions


def test_factor_zero_returns_input():
    x = grey_image(8)
    for kind in ("gaussiannoise", "saltpepper", "gaussianblur"):
        assert apply_corruption(x, kind, 0, "voc2012", seed=1) is x


def test_gaussian_noise_has_requested_std_on_255_scale():
    x = grey_image()
    for std in (5.0, 20.0):
        noisy = apply_corruption(x, "gaussiannoise", std, "voc2012", seed=3)
        diff = rgb_by_hand(noisy) - 128.0
        assert abs(diff.std().item() - std) / std < 0.02 and abs(diff.mean().item()) < 0.2
    assert torch.equal(
        apply_corruption(x, "gaussiannoise", 5, "voc2012", seed=3),
        apply_corruption(x, "gaussiannoise", 5, "voc2012", seed=3),
    )
    assert not torch.equal(
        apply_corruption(x, "gaussiannoise", 5, "voc2012", seed=3),
        apply_corruption(x, "gaussiannoise", 5, "voc2012", seed=4),
    )
    events = torch.zeros(2, 200, 200)  # mid-range after per-channel scaling: 127.5 on the 0-255 scale
    diff = apply_corruption(events, "gaussiannoise", 10, "ddd17", seed=0) * 255
    assert abs(diff.std().item() - 10) < 0.2
    assert apply_corruption(events, "gaussiannoise", 1000, "ddd17", seed=0).abs().max() <= 0.5  # clipped


def test_salt_pepper_flips_about_p_of_pixels():
    x = normalize_image(torch.randint(20, 236, (3, 200, 200)).float())
    p = 0.1
    out = rgb_by_hand(apply_corruption(x, "saltpepper", p, "voc2012", seed=0))
    changed = (out - rgb_by_hand(x)).abs().amax(0) > 1e-3
    frac = changed.float().mean().item()
    assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / changed.numel())
    black = (out.abs() < 1e-3).all(0)
    white = ((out - 255).abs() < 1e-3).all(0)
    assert torch.equal(changed, black | white)  # a hit pixel is black or white in every channel
    assert abs(white[changed].float().mean().item() - 0.5) < 0.05
    thl = torch.zeros(4, 2, 50, 50)
    hits = apply_corruption(thl, "saltpepper", 0.2, "synthetic-events", seed=1) != 0
    assert abs(hits[:, 0].float().mean().item() - 0.2) < 0.03 and torch.equal(hits[:, 0], hits[:, 1])


def test_gaussian_blur_keeps_constant_image_and_smooths():
    x = grey_image(32, 77.0)
    assert torch.allclose(apply_corruption(x, "gaussianblur", 2.0, "voc2012", seed=0), x, atol=1e-6)
    noisy = normalize_image(torch.randint(0, 256, (3, 32, 32)).float())
    blurred = apply_corruption(noisy, "gaussianblur", 1.5, "voc2012", seed=0)
    assert blurred.std() < 0.5 * noisy.std()
    assert torch.allclose(blurred.mean(), noisy.mean(), atol=0.02)
    tiny = torch.rand(2, 6, 6) - 0.5
    assert apply_corruption(tiny, "gaussianblur", 10.0, "ddd17", seed=0).shape == tiny.shape


def test_corruption_errors():
    x = grey_image(8)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        apply_corruption(x, "fog", 1, "voc2012", 0)
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        apply_corruption(x, "gaussiannoise", 0, "kitti", 0)
    with pytest.raises(ValueError, match=r"saltpepper must be in \[0, 1\], got 1.5"):
        apply_corruption(x, "saltpepper", 1.5, "voc2012", 0)


# ---------------------------------------------------------------- transforms


def test_normalisation_round_trip_and_sizes():
    rgb = torch.randint(0, 256, (3, 5, 7)).float()
    assert torch.allclose(rgb_by_hand(normalize_image(rgb)).float(), rgb, atol=1e-4)
    assert parse_size(None) is None and parse_size(-1) is None and parse_size(64) == [64, 64]
    assert parse_size([32, 48]) == [32, 48]
    with pytest.raises(ValueError, match="img_size"):
        parse_size([0, 4])


@pytest.mark.parametrize("make", [lambda: ddd17_transform(None, augment=True), lambda: voc_transform(40, augment=True)])
def test_paired_augmentation_keeps_input_and_label_aligned(make):
    torch.manual_seed(0)
    transform = make()
    yy, xx = torch.meshgrid(torch.arange(60), torch.arange(60), indexing="ij")
    label = ((xx // 15 + yy // 20) % 3).long()
    x = torch.stack([(label == 1).float() * 10, (label == 2).float() * 10])
    for _ in range(8):
        xt, yt = transform(x, label)
        assert set(torch.unique(yt).tolist()) <= {0, 1, 2, 255}
        valid = yt != 255
        agree = ((xt[0] > 5) == (yt == 1))[valid].float().mean() + ((xt[1] > 5) == (yt == 2))[valid].float().mean()
        assert agree / 2 > 0.9
        if (~valid).any():  # padding: 0 for the input where the label is fill (bilinear blurs the edge)
            assert (xt[:, ~valid] == 0).float().mean() > 0.9


# ---------------------------------------------------------------- datalists


def test_voc_datalists_write_and_check(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "voc")
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    (voc / "SegmentationClassAug").mkdir()
    for name in ("2007_000032", "2007_000033"):
        mask = np.array(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClassAug" / f"{name}.png")
    assert datalists.main(["--dataset", "voc2012", "--root", str(tmp_path / "voc"), "--split", "train_aug"]) == 0
    written = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    assert written.read_text() == "2007_000032\n"  # 2007_000033 is in val
    assert datalists.main(["--dataset", "voc2012", "--root", str(voc), "--check", str(written), "--deep"]) == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("2007_000032\nghost_1\n")
    assert datalists.main(["--dataset", "voc2012", "--root", str(voc), "--check", str(bad)]) == 2
    assert "['ghost_1']" in capsys.readouterr().err
    out = tmp_path / "val_list.txt"
    assert datalists.main(["--dataset", "voc2012", "--root", str(voc), "--split", "val", "--out", str(out)]) == 0
    assert out.read_text() == "2007_000033\n"


# ---------------------------------------------------------------- visualisation


def test_render_sample_panels():
    x, y = SyntheticShapes("val", 2)[1]
    pred = torch.full_like(y, 255)
    pred[0, 0] = 2
    picture = np.asarray(visualize.render_sample(x, y, "synthetic", pred=pred))
    assert picture.shape == (48, 3 * 48 + 4, 3)
    assert np.abs(picture[:, :48].astype(float) - rgb_by_hand(x).permute(1, 2, 0).numpy()).max() <= 1.0
    label_panel = picture[:, 50:98]
    for c in range(4):
        assert (label_panel[y.numpy() == c] == SYNTHETIC_PALETTE[c]).all()
    assert tuple(picture[0, 100]) == SYNTHETIC_PALETTE[2] and tuple(picture[1, 100]) == (255, 255, 255)
    assert tuple(visualize.colourize(np.array([[15]]), VOC_PALETTE[:21])[0, 0]) == (192, 128, 128)


def test_render_events_and_cli(tmp_path):
    x = torch.zeros(3, 2, 4, 5)
    x[-1, 0, 1, 2], x[-1, 1, 2, 3] = 0.5, 0.5  # last THL frame is shown
    picture = np.asarray(visualize.render_sample(x, torch.zeros(4, 5, dtype=torch.long), "ddd17"))
    assert tuple(picture[1, 2]) == (255, 0, 127) and tuple(picture[2, 3]) == (127, 0, 255)
    out = tmp_path / "grid.png"
    assert visualize.main(["--dataset", "synthetic-events", "--index", "0", "5", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 48 + 2, 2 * (48 + 2))
    assert visualize.main(["--dataset", "voc2012", "--data-root", str(tmp_path), "--out", str(out)]) == 2
