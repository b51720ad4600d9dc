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


LATE_US = 1_000_000  # a label this long after the last event is outside the events' time range


class EmptyWindowWarning(UserWarning):
    """Some windows of a raw-event dataset hold no event, or lie outside its events' time range."""


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
        ess_exact=True,
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
        check_window(window_ms, window_events)
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
        self.ess_exact = bool(ess_exact)

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

    def tensor(self, events, height, width, loader, window=None):
        """[B, C, H, W] float32 array of a window's events (dict x, y, t, p), normalised, on the whole sensor,
        in the arithmetic of ESS's `loader` ('dsec' or 'ddd17'). window: (start, end) of a time window (on
        the events' clock), None for an event-count window."""
        x, y, t, p = (events[k] for k in ("x", "y", "t", "p"))
        exact = self.ess_exact
        if window is None or self.window_events is not None:
            rule, window = "count", None
        else:
            rule = "window" if loader == "dsec" else "span"
        norm = dict(mode=self.normalize, loader=loader, exact=exact)
        if self.representation == "voxel":
            (lo, hi), *_ = rep.parts(t, 1, rule, window, exact)
            grid = rep.voxel_grid(
                x[lo:hi], y[lo:hi], t[lo:hi], p[lo:hi], self.bins, height, width, self.separate_polarity, loader, exact
            )
            return rep.normalize(grid, **norm)
        if self.representation == "histogram":
            out = np.empty((self.bins, 2, height, width), dtype=np.float32)
            for b, (lo, hi) in enumerate(rep.parts(t, self.bins, rule, window, exact)):
                counts = rep.histogram(x[lo:hi], y[lo:hi], p[lo:hi], height, width, truncate=exact and loader == "dsec")
                out[b] = rep.normalize(counts, **norm)  # ESS normalises each part it builds
            return out
        start, end = window if window is not None else (None, None)
        grid = rep.evsegnet(x, y, t, p, self.bins, height, width, start, end, self.channels)
        return rep.normalize(grid, **norm)

    def shape_item(self, grid):
        """[B, C, H, W] -> the item: [B, C, H, W] as timesteps, else [B*C, H, W] in ESS's channel order:
        bin-major (b*C + c), except the two-polarity voxel grid, polarity-major (c*B + b: the positive
        bins, then the negative ones)."""
        x = torch.from_numpy(np.ascontiguousarray(grid))
        if self.as_timesteps:
            return x
        if self.representation == "voxel" and self.separate_polarity:
            x = x.transpose(0, 1)
        return x.reshape(-1, *x.shape[-2:])


def check_window(window_ms, window_events):
    """window_ms and window_events both set: one would be ignored. Here, where only values are known, window_ms
    at its default (50) counts as not set; the run's configuration, which knows the keys the user gave,
    refuses a given 50 too (utils/config.py check_combinations)."""
    if window_events is not None and window_ms is not None and float(window_ms) != WINDOW_MS:
        raise ValueError(
            f"window_ms ({float(window_ms):g}) and window_events ({window_events}) are both set: give one "
            "(window_ms: the window's length; window_events: its number of events)"
        )


def resize_pair(x, y, size):
    """Resize an item (x [..., h, w], label y [h, w]) to size (h, w); None keeps it. Enlarging (the only
    resizing ESS does: DDD17 to 200x352, DSEC's resize option to 448x640) is ESS's: bilinear with
    align_corners=True for x, OpenCV's nearest (source floor(i * in/out)) for y. Reducing, which ESS never
    does, is antialiased bilinear for x and nearest for y."""
    if size is None or tuple(size) == tuple(y.shape):
        return x, y
    flat = x.reshape(-1, *x.shape[-2:])[None]
    if size[0] >= y.shape[0] and size[1] >= y.shape[1]:
        flat = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=True)[0]
        rows, cols = (np.minimum(np.floor(np.arange(o) * (1.0 / (o / i))), i - 1) for o, i in zip(size, y.shape))
        y = y[torch.from_numpy(rows.astype(np.int64))][:, torch.from_numpy(cols.astype(np.int64))]
    else:
        flat = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
        y = F.interpolate(y[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()
    return flat.reshape(*x.shape[:-2], *size), y


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
        ess_exact=bool(cfg["ess_exact"]),
    )


def check(cfg):
    """The spec check of the raw-event datasets (before any file is read)."""
    check_window(cfg["window_ms"], cfg["window_events"])


def in_channels_of(cfg):
    settings = settings_from_cfg(cfg)
    if settings.as_timesteps and settings.bins != int(cfg["timesteps"]):
        raise ValueError(
            f"thl feeds one time bin per timestep: bins ({settings.bins}) must equal timesteps ({cfg['timesteps']})"
        )
    return settings.in_channels


_D = "data"
WINDOW_MS = 50.0
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
    Key(
        "window_ms",
        _D,
        WINDOW_MS,
        float,
        "raw events: window length before each label (ms); not with window_events",
        interval=ABOVE_ZERO,
    ),
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
    Key(
        "ess_exact",
        _D,
        True,
        bool,
        "raw events: items as ESS's loaders build them, their defects included (the published numbers); "
        "false: the defects corrected (docs/data.md)",
    ),
    CHANNELS,
)
