"""PASCAL VOC2012 segmentation (optionally SBD-augmented), read as the paper's code reads it.

Layout (root is the VOC2012 folder itself or any folder containing VOCdevkit/VOC2012):

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClass/<id>.png          palette PNGs: pixel value = class index, 255 = void
    VOC2012/SegmentationClassAug/<id>.png       SBD-augmented masks (plain 8-bit), for train_aug
    VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    VOC2012/ImageSets/Segmentation/train_aug.txt (or ImageSets/SegmentationAug/train_aug.txt)

torchvision's VOCSegmentation knows neither train_aug nor list files and does not
validate masks, so the reading is done here with PIL; transforms use v2.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common import files
from common.keys import Key
from data.palettes import VOC_PALETTE
from data.registry import IMAGES, DatasetSpec
from data.transforms import IGNORE_INDEX, normalize_image, voc_transform

CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
NUM_CLASSES = len(CLASSES)
STANDARD_SPLITS = ("train", "val", "trainval")
LAYOUT = (
    "<root>/VOCdevkit/VOC2012 or <root> itself containing JPEGImages/*.jpg, SegmentationClass/*.png and "
    "ImageSets/Segmentation/{train,val,trainval}.txt"
)


def find_voc_dir(root) -> Path:
    """The VOC2012 folder under root (root itself or root/VOCdevkit/VOC2012)."""
    root = Path(root)
    for candidate in (root, root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(f"VOC2012 not found at {root}: expected {LAYOUT}")


def split_list_and_masks(voc_dir: Path, split):
    """(list file, mask folder) for a split name or a list-file path."""
    if split == "train_aug":
        for folder in ("Segmentation", "SegmentationAug"):
            path = voc_dir / "ImageSets" / folder / "train_aug.txt"
            if path.is_file():
                return path, voc_dir / "SegmentationClassAug"
        raise FileNotFoundError(
            f"train_aug list not found: expected {voc_dir}/ImageSets/Segmentation/train_aug.txt "
            f"or {voc_dir}/ImageSets/SegmentationAug/train_aug.txt (see README.md, section Data: SBD)"
        )
    if split in STANDARD_SPLITS:
        path = voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"split list {path} not found: expected {LAYOUT}")
        return path, voc_dir / "SegmentationClass"
    path = Path(split)
    if path.is_file():
        # A custom list: masks from SegmentationClassAug when named like an augmented list, else the originals.
        aug = "aug" in path.stem.lower()
        return path, voc_dir / ("SegmentationClassAug" if aug else "SegmentationClass")
    raise FileNotFoundError(
        f"VOC split {split!r} is neither one of {STANDARD_SPLITS + ('train_aug',)} nor a list file that exists"
    )


def read_ids(list_path: Path):
    """Image ids of a list file: one per line, the first word (SBD lists may add a path pair)."""
    ids = []
    for line in Path(list_path).read_text().splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    if not ids:
        raise ValueError(f"list file {list_path} names no images")
    return ids


def missing_files(voc_dir: Path, mask_dir: Path, ids):
    """Ids whose image or mask file is absent."""
    return [
        i for i in ids if not (voc_dir / "JPEGImages" / f"{i}.jpg").is_file() or not (mask_dir / f"{i}.png").is_file()
    ]


def load_rgb(path: Path) -> torch.Tensor:
    """uint8 RGB [3, H, W]; names the file when it cannot be decoded."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_mask(path: Path, num_classes: int) -> torch.Tensor:
    """int64 [H, W] class indices (palette indices for 'P' PNGs), validated."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise ValueError(f"mask {path} has mode {img.mode}; expected a palette ('P') or 8-bit ('L') PNG")
            array = np.array(img)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err
    check_labels(array, num_classes, path)
    return torch.from_numpy(array.astype(np.int64))


def check_labels(array: np.ndarray, num_classes: int, path) -> None:
    values = np.unique(array)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(f"mask {path} has label values {bad.tolist()} outside 0..{num_classes - 1} and {IGNORE_INDEX}")


class VOC2012(torch.utils.data.Dataset):
    """Items: image float32 [3, H, W] (BGR, minus mean, / 255), mask int64 [H, W] (255 = void).

    img_size: None/-1 native, int or (h, w) resize (bilinear image, nearest mask).
    augment: random horizontal flip and random resized crop (to img_size).
    void_to_background: map void (255) to background (0), as the paper's training did.
    """

    def __init__(self, root, split="train", img_size=None, augment=False, void_to_background=False):
        self.voc_dir = find_voc_dir(root)
        self.list_path, self.mask_dir = split_list_and_masks(self.voc_dir, split)
        self.ids = read_ids(self.list_path)
        files.check_readable_folder(self.voc_dir / "JPEGImages", "image folder")
        files.check_readable_folder(self.mask_dir, "mask folder")
        missing = missing_files(self.voc_dir, self.mask_dir, self.ids)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.ids)} entries of {self.list_path} have no image in "
                f"{self.voc_dir / 'JPEGImages'} or no mask in {self.mask_dir}; first: {missing[:5]}"
            )
        self.transform = voc_transform(img_size, augment)
        self.void_to_background = void_to_background

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        name = self.ids[index]
        rgb = load_rgb(self.voc_dir / "JPEGImages" / f"{name}.jpg")
        mask = load_mask(self.mask_dir / f"{name}.png", NUM_CLASSES)
        if rgb.shape[1:] != mask.shape:
            raise ValueError(f"image {name}.jpg is {tuple(rgb.shape[1:])} but its mask is {tuple(mask.shape)}")
        image = normalize_image(rgb)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        if self.void_to_background:
            mask = torch.where(mask == IGNORE_INDEX, torch.zeros_like(mask), mask)
        return image, mask


def build(cfg, split):
    training = split == "train"
    return VOC2012(
        cfg["data_root"],
        cfg["train_split"] if training else "val",
        img_size=cfg.get("img_size"),
        augment=bool(cfg["augment"]) and training,
        void_to_background=bool(cfg["void_to_background"]) and training,
    )


SPEC = DatasetSpec(
    name="voc2012",
    build=build,
    classes=CLASSES,
    palette=tuple(VOC_PALETTE[:NUM_CLASSES]),
    modality=IMAGES,
    in_channels=3,
    needs_root=True,
    keys=(
        Key("train_split", "data", "train", str, "voc2012 training list: train, train_aug, trainval or a list file"),
        Key(
            "void_to_background",
            "data",
            False,
            bool,
            "voc2012 training: void (255) becomes background, as in the paper",
        ),
    ),
)
