"""VOC2012 on the two real fixture samples, and every error path on copies of them."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data.palettes import VOC_PALETTE
from data.voc2012 import VOC2012

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "voc2012-mini"
VOC_DIR = FIXTURE / "VOCdevkit" / "VOC2012"
IDS = ("2007_000032", "2007_000033")


def counts_from_colours(name):
    """Class pixel counts decoded independently: render the palette PNG to RGB, map colours back."""
    rgb = np.asarray(Image.open(VOC_DIR / "SegmentationClass" / f"{name}.png").convert("RGB")).reshape(-1, 3)
    colour_to_index = {colour: index for index, colour in enumerate(VOC_PALETTE)}
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    return {colour_to_index[tuple(int(v) for v in c)]: int(n) for c, n in zip(colours, counts)}


@pytest.fixture
def voc_copy(tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(FIXTURE, root)
    return root / "VOCdevkit" / "VOC2012"


def test_palette_matches_known_voc_colours():
    assert VOC_PALETTE[0] == (0, 0, 0) and VOC_PALETTE[1] == (128, 0, 0) and VOC_PALETTE[15] == (192, 128, 128)
    assert VOC_PALETTE[255] == (224, 224, 192)


@pytest.mark.parametrize("index,name", enumerate(IDS))
def test_native_masks_have_exact_class_counts(index, name):
    ds = VOC2012(FIXTURE, "trainval")
    assert ds.ids == list(IDS)
    image, mask = ds[index]
    width, height = Image.open(VOC_DIR / "JPEGImages" / f"{name}.jpg").size
    assert image.shape == (3, height, width) and mask.shape == (height, width)
    assert (width, height) == ((500, 281) if index == 0 else (500, 366))
    assert mask.dtype == torch.int64 and image.dtype == torch.float32
    values, counts = torch.unique(mask, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == counts_from_colours(name)
    assert 255 in values.tolist()  # void kept


def test_normalisation_by_hand():
    image, _ = VOC2012(VOC_DIR, "train")[0]
    rgb = np.asarray(Image.open(VOC_DIR / "JPEGImages" / "2007_000032.jpg").convert("RGB")).astype(np.float64)
    for row, col in ((0, 0), (140, 250), (280, 499), (17, 333)):
        r, g, b = rgb[row, col]
        expected = [(b - 104.00699) / 255, (g - 116.66877) / 255, (r - 122.67892) / 255]
        assert np.allclose(image[:, row, col].numpy(), expected, atol=1e-6)


def test_resized_mask_is_nearest_and_valid():
    image, mask = VOC2012(FIXTURE, "train", img_size=64)[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
    native = np.array(Image.open(VOC_DIR / "SegmentationClass" / "2007_000032.png"))
    rows = np.floor(np.arange(64) * 281 / 64).astype(int)
    cols = np.floor(np.arange(64) * 500 / 64).astype(int)
    assert np.array_equal(mask.numpy(), native[rows][:, cols])
    assert set(torch.unique(mask).tolist()) <= {0, 1, 15, 255}
    # bilinear image stays within the native value range
    full, _ = VOC2012(FIXTURE, "train")[0]
    assert full.min() - 1e-4 <= image.min() and image.max() <= full.max() + 1e-4
    _, rect = VOC2012(FIXTURE, "val", img_size=(40, 72))[0]
    assert rect.shape == (40, 72)


def test_void_to_background_and_augment():
    _, mask = VOC2012(FIXTURE, "train", void_to_background=True)[0]
    counts = counts_from_colours("2007_000032")
    assert (mask == 255).sum() == 0 and (mask == 0).sum() == counts[0] + counts[255]
    torch.manual_seed(0)
    for _ in range(3):
        image, mask = VOC2012(FIXTURE, "train", img_size=48, augment=True)[0]
        assert image.shape == (3, 48, 48) and set(torch.unique(mask).tolist()) <= {0, 1, 15, 255}


def test_registry_uses_train_split_and_val(voc_copy):
    (voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/2007_000033.jpg /SegmentationClassAug/2007_000033.png\n"
    )
    aug = voc_copy / "SegmentationClassAug"
    aug.mkdir()
    plain = np.array(Image.open(voc_copy / "SegmentationClass" / "2007_000033.png"))
    Image.fromarray(plain, mode="L").save(aug / "2007_000033.png")
    cfg = dict(dataset="voc2012", data_root=str(voc_copy.parents[1]), train_split="train_aug", img_size=-1)
    train = data.build_dataset(cfg, "train")
    assert train.ids == ["2007_000033"] and torch.equal(train[0][1], torch.from_numpy(plain.astype(np.int64)))
    assert data.build_dataset(cfg, "val").ids == ["2007_000033"]
    listed = voc_copy.parent / "mine.txt"
    listed.write_text("2007_000032\n\n2007_000033\n")
    assert VOC2012(voc_copy, str(listed)).ids == list(IDS)


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*JPEGImages.*SegmentationClass"):
        VOC2012(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="train_aug list not found"):
        VOC2012(FIXTURE, "train_aug")
    with pytest.raises(FileNotFoundError, match="'nosuch' is neither"):
        VOC2012(FIXTURE, "nosuch")


def test_corrupt_files_are_named(voc_copy):
    (voc_copy / "JPEGImages" / "2007_000032.jpg").write_bytes(b"not a jpeg")
    ds = VOC2012(voc_copy, "train")
    with pytest.raises(ValueError, match="cannot read image .*2007_000032.jpg"):
        ds[0]
    (voc_copy / "SegmentationClass" / "2007_000033.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot read mask .*2007_000033.png"):
        VOC2012(voc_copy, "val")[0]


def test_label_values_outside_classes_are_named(voc_copy):
    path = voc_copy / "SegmentationClass" / "2007_000033.png"
    mask = np.array(Image.open(path))
    mask[0, :3] = [21, 40, 40]
    Image.fromarray(mask, mode="L").save(path)
    with pytest.raises(ValueError, match=r"2007_000033.png has label values \[21, 40\]"):
        VOC2012(voc_copy, "val")[0]


def test_list_entries_without_files_are_named(voc_copy):
    listed = voc_copy / "ImageSets" / "Segmentation" / "train.txt"
    listed.write_text("2007_000032\n" + "".join(f"missing_{i}\n" for i in range(8)))
    (voc_copy / "SegmentationClass" / "2007_000032.png").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"9 of 9 entries .*first: \['2007_000032', 'missing_0', "
        r"'missing_1', 'missing_2', 'missing_3'\]",
    ):
        VOC2012(voc_copy, "train")
    listed.write_text("\n")
    with pytest.raises(ValueError, match="names no images"):
        VOC2012(voc_copy, "train")


def test_native_size_batches_are_padded_with_the_ignore_label():
    ds = VOC2012(FIXTURE, "trainval", img_size=-1)
    items = [ds[0], ds[1]]
    assert items[0][1].shape != items[1][1].shape  # 281x500 and 366x500: default collation would fail
    x, y = data.collate(items)
    assert x.shape == (2, 3, 366, 500) and y.shape == (2, 366, 500)
    for i, (xi, yi) in enumerate(items):
        h, w = yi.shape
        assert torch.equal(x[i, :, :h, :w], xi) and torch.equal(y[i, :h, :w], yi)
        assert (x[i, :, h:] == 0).all() and (y[i, h:] == 255).all()  # 0: the mean colour; 255: not counted
    counted = sum(int((np.array(Image.open(VOC_DIR / "SegmentationClass" / f"{n}.png")) != 255).sum()) for n in IDS)
    assert int((y != 255).sum()) == counted
    same = [ds[1], ds[1]]
    assert all(torch.equal(a, b) for a, b in zip(data.collate(same), torch.utils.data.default_collate(same)))
