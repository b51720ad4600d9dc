"""The dataset registry: each dataset is one ``DatasetSpec``, the one place that states its facts.

A spec names the dataset, its classes and palette, its input channels, its modality (images or events),
whether it reads a local ``data_root``, the configuration keys only it reads, and the function that
builds its splits. Everything else reads these facts from here: the configuration layer (flags, the
keys that apply to a dataset, the checks made before any data is read), the evaluation (class names,
palette) and the corruption and visualisation tools (modality). Adding a dataset is one module with one
spec, registered in ``data/__init__.py``.
"""

from dataclasses import dataclass, field
from typing import Callable

from common.keys import POSITIVE, Key, key_table

from .transforms import IGNORE_INDEX

IMAGES, EVENTS = "images", "events"
SPLITS = ("train", "val")

_D = "data"
# Keys that every dataset reads (or that apply to a family of datasets, as stated in their help).
COMMON_KEYS = key_table(
    [
        Key("dataset", _D, "voc2012", str, "dataset", lambda: sorted(DATASETS)),
        Key("data_root", _D, None, str, "dataset folder (the datasets that read local files)", optional=True),
        Key("augment", _D, False, bool, "random flips, crops / affine transforms of the training split"),
        Key("thl", _D, False, bool, "target history learning: the T frames before each label, one per timestep"),
    ]
)
# Keys shared by the synthetic datasets (each spec lists the keys it reads).
NUM_TRAIN = Key(
    "num_train",
    _D,
    None,
    int,
    "synthetic datasets: training samples (default: the dataset's own)",
    interval=POSITIVE,
    optional=True,
)
NUM_VAL = Key(
    "num_val",
    _D,
    None,
    int,
    "synthetic datasets: validation samples (default: the dataset's own)",
    interval=POSITIVE,
    optional=True,
)


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the code may know about a dataset.

    ``build(cfg, split)`` returns the torch Dataset of a split ('train' or 'val') from the run config
    ``cfg`` (the data keys completed with their defaults; ``img_size``, ``timesteps`` and ``seed`` as the
    run sets them). ``in_channels``, ``classes`` and ``palette`` are values or functions of ``cfg`` (event
    sets: the chosen channels or representation; DSEC-Semantic: its 11 or 19 classes). ``check(cfg)``, if
    given, refuses settings that mean nothing for this dataset, before any file is read.
    """

    name: str
    build: Callable
    classes: tuple
    palette: tuple
    modality: str
    in_channels: object
    needs_root: bool
    keys: tuple = ()
    check: Callable | None = None
    synthetic: bool = False
    notes: str = field(default="", compare=False)  # one line for --help and docs

    def info(self, cfg: dict | None = None) -> dict:
        cfg = resolved(cfg)
        classes, palette, channels = (_of(value, cfg) for value in (self.classes, self.palette, self.in_channels))
        return dict(
            num_classes=len(classes),
            in_channels=int(channels),
            class_names=list(classes),
            ignore_index=IGNORE_INDEX,
            palette=[tuple(c) for c in palette],
        )


def _of(value, cfg):
    return value(cfg) if callable(value) else value


DATASETS: dict = {}


def register(*specs: DatasetSpec):
    for spec in specs:
        if spec.name in DATASETS:
            raise ValueError(f"dataset {spec.name!r} is registered twice")
        if spec.modality not in (IMAGES, EVENTS):
            raise ValueError(f"dataset {spec.name!r}: modality must be {IMAGES!r} or {EVENTS!r}")
        DATASETS[spec.name] = spec


def get(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choices: {sorted(DATASETS)}")
    return DATASETS[name]


def names(modality: str | None = None, synthetic: bool | None = None) -> tuple:
    """The registered datasets, optionally only those of a modality / synthetic or not."""
    return tuple(
        name
        for name, spec in DATASETS.items()
        if (modality is None or spec.modality == modality) and (synthetic is None or spec.synthetic == synthetic)
    )


def data_keys() -> dict:
    """{name: Key} of every data key: the common ones and each dataset's own (shared ones once)."""
    return key_table(COMMON_KEYS.values(), *(spec.keys for spec in DATASETS.values()))


def datasets_reading(name: str) -> tuple:
    """The datasets a key applies to: every one for a common key, else the specs that list it."""
    if name == "data_root":
        return tuple(n for n, spec in DATASETS.items() if spec.needs_root)
    if name == "thl":
        return names(EVENTS)
    if name in COMMON_KEYS:
        return tuple(DATASETS)
    return tuple(n for n, spec in DATASETS.items() if any(key.name == name for key in spec.keys))


def resolved(cfg: dict | None) -> dict:
    """``cfg`` with every data key it lacks at its default."""
    return {**{name: key.default_value() for name, key in data_keys().items()}, **(cfg or {})}


def build_dataset(cfg: dict, split: str):
    """The dataset named by cfg['dataset'] for split 'train' or 'val'."""
    cfg = resolved(cfg)
    spec = get(cfg["dataset"])
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if spec.needs_root and not cfg["data_root"]:
        raise ValueError(
            f"dataset {spec.name!r} needs data_root (a local folder); see docs/data.md for the layout it reads"
        )
    if spec.check is not None:
        spec.check(cfg)
    return spec.build(cfg, split)


def dataset_info(name: str, cfg: dict | None = None) -> dict:
    """num_classes, in_channels, class_names, ignore_index and palette of a dataset (event sets: the
    channels chosen in cfg, else their default)."""
    return get(name).info(cfg)
