"""Shared by the raw-event datasets: label reading, window/representation settings, output shaping.
No import of utils/ (scripts -> utils -> data)."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from common.keys import ABOVE_ZERO, POSITIVE, Key
from data.event_frames import CHANNELS
from data.events import representations as rep
from data.transforms import IGNORE_INDEX


def read_label(path, num_classes):
    """uint8 8-bit / palette PNG -> int64 [H, W]; values must be class indices or 255."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise ValueError(f"label {path} has mode {img.mode}; expected an 8-bit ('L') or palette ('P') PNG")
            array = np.array(img)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read label {path}: {err}") from None
    values = np.unique(array)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(f"label {path} has values {bad.tolist()} outside 0..{num_classes - 1} and {IGNORE_INDEX}")
    return torch.from_numpy(array.astype(np.int64))


def label_size(path):
    """(height, width) of a PNG without decoding it."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read label {path}: {err}") from None


class EventSettings:
    """How a window of events becomes an input tensor (the config keys of the event datasets)."""

    def __init__(
        self,
        representation="voxel",
        bins=5,
        separate_polarity=False,
        window_ms=50.0,
        window_events=None,
        normalize="nonzero",
        channels=None,
        as_timesteps=False,
    ):
        if representation not in rep.REPRESENTATIONS:
            raise ValueError(f"representation must be one of {', '.join(rep.REPRESENTATIONS)}, got {representation!r}")
        if normalize not in rep.NORMALIZATIONS:
            raise ValueError(f"event_norm must be one of {', '.join(rep.NORMALIZATIONS)}, got {normalize!r}")
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if window_events is None and not float(window_ms) > 0:
            raise ValueError(f"window_ms must be > 0, got {window_ms}")
        if window_events is not None and int(window_events) < 1:
            raise ValueError(f"window_events must be >= 1, got {window_events}")
        self.representation = representation
        self.bins = int(bins)
        self.separate_polarity = bool(separate_polarity)
        self.window_ms = float(window_ms)
        self.window_events = None if window_events is None else int(window_events)
        self.normalize = normalize
        self.channels = None if channels is None else [int(c) for c in channels]
        if representation == "evsegnet" and self.channels is not None:
            if not self.channels or any(not 0 <= c < 6 for c in self.channels):
                raise ValueError(f"channels: Ev-SegNet channels must be indices in 0..5, got {self.channels}")
        self.as_timesteps = bool(as_timesteps)

    @property
    def per_bin(self):
        return rep.channels_per_bin(self.representation, self.separate_polarity, self.channels)

    @property
    def in_channels(self):
        return self.per_bin if self.as_timesteps else self.per_bin * self.bins

    def window_kwargs(self):
        if self.window_events is not None:
            return dict(count=self.window_events)
        return dict(duration_us=int(round(self.window_ms * 1000)))

    def tensor(self, events, height, width, unbiased, window=None):
        """[B, C, height, width] float32 array of a window's events (normalised on the whole sensor)."""
        grid = rep.represent(
            events,
            self.representation,
            self.bins,
            height,
            width,
            separate_polarity=self.separate_polarity,
            channels=self.channels,
            window=window if self.window_events is None else None,
        )
        return rep.normalize(grid, self.normalize, unbiased=unbiased)

    def shape_item(self, grid):
        """[B, C, H, W] -> the item: [B, C, H, W] as timesteps, else [B*C, H, W]."""
        x = torch.from_numpy(np.ascontiguousarray(grid))
        return x if self.as_timesteps else x.reshape(-1, *x.shape[-2:])


def resize_pair(x, y, size):
    """Bilinear (antialiased) input, nearest label, to size (h, w); None keeps the size."""
    if size is None:
        return x, y
    flat = x.reshape(-1, *x.shape[-2:])[None]
    flat = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    x = flat.reshape(*x.shape[:-2], *size)
    y = F.interpolate(y[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()
    return x, y


def parse_size(value):
    """None, -1 or [-1]: native; int: square; [h, w]."""
    if value is None:
        return None
    sizes = list(value) if isinstance(value, (list, tuple)) else [value]
    sizes = [int(s) for s in sizes]
    if sizes == [-1]:
        return None
    if not sizes or len(sizes) > 2 or min(sizes) < 1:
        raise ValueError(f"img_size must be one positive int, two (H W) or -1, got {value}")
    return sizes * 2 if len(sizes) == 1 else sizes


def flip_pair(x, y, augment):
    """Random horizontal flip (probability 0.5), the augmentation of ESS's loaders."""
    if augment and torch.rand(()) < 0.5:
        return x.flip(-1), y.flip(-1)
    return x, y


def settings_from_cfg(cfg):
    return EventSettings(
        representation=cfg["representation"],
        bins=cfg["bins"],
        separate_polarity=cfg["separate_polarity"],
        window_ms=cfg["window_ms"],
        window_events=cfg["window_events"],
        normalize=cfg["event_norm"],
        channels=cfg["channels"] if cfg["representation"] == "evsegnet" else None,
        as_timesteps=bool(cfg["thl"]),
    )


def in_channels_of(cfg):
    settings = settings_from_cfg(cfg)
    if settings.as_timesteps and settings.bins != int(cfg["timesteps"]):
        raise ValueError(
            f"thl feeds one time bin per timestep: bins ({settings.bins}) must equal timesteps ({cfg['timesteps']})"
        )
    return settings.in_channels


_D = "data"
# The keys of the raw-event datasets (dsec-semantic, ddd17-events, synthetic-events with raw_events); also
# `channels` (the Ev-SegNet channels kept by representation evsegnet) and `thl` (bins as timesteps).
KEYS = (
    Key(
        "representation",
        _D,
        "voxel",
        str,
        "raw events: voxel (bilinear voxel grid), histogram (per-polarity counts) or evsegnet (6 channels)",
        ("voxel", "histogram", "evsegnet"),
    ),
    Key("bins", _D, 5, int, "raw events: time bins (channels, or timesteps with --thl)", interval=POSITIVE),
    Key("separate_polarity", _D, False, bool, "raw events, voxel: positive and negative as two channels"),
    Key("window_ms", _D, 50.0, float, "raw events: window length before each label (ms)", interval=ABOVE_ZERO),
    Key(
        "window_events",
        _D,
        None,
        int,
        "raw events: window of this many events instead of window_ms (DSEC 100000, DDD17 32000 in the papers)",
        interval=POSITIVE,
        optional=True,
    ),
    Key(
        "event_norm",
        _D,
        "nonzero",
        str,
        "raw events: nonzero (mean/std of the non-zero entries, ESS), minmax ([-0.5, 0.5] per channel) or none",
        ("nonzero", "minmax", "none"),
    ),
    CHANNELS,
)
