"""Embedded datasets generated on the fly: no files, deterministic from (seed, split, index).

`SyntheticShapes` ('synthetic'): RGB images of large discs, triangles and bars on
cluttered backgrounds. Every class draws its colour from the same distribution, and the
background's gradient and clutter use that distribution too, so no per-pixel colour rule
separates the classes: the shape does. Objects are large relative to the image and
textured (stripes or speckle), so a small spiking DeepLab learns it in minutes.

`SyntheticEvents` ('synthetic-events'): the same shapes, textured, moving (bouncing off
the borders, slowly rotating) over a static textured background, seen by a simulated
event camera. Each frame is a (6, H, W) array in DDD17's channel layout (positive count,
negative count, positive mean timestamp, positive timestamp std, negative mean timestamp,
negative timestamp std), from log-intensity changes at K sub-steps between frames. A
sequence is `seq_len` consecutive frames; with `thl=True` an item is the T frames ending
at a target frame, and the first T-1 frames of each sequence are only history.
"""

import numpy as np
import torch

from common.keys import POSITIVE, Key, parse_size
from data.event_frames import CHANNELS, check_channels
from data.events import common as event_common
from data.events import synthetic_raw
from data.events.h5 import require_hdf5plugin
from data.palettes import SYNTHETIC_PALETTE
from data.registry import EVENTS, IMAGES, NUM_TRAIN, NUM_VAL, DatasetSpec
from data.transforms import normalize_image, scale_events

CLASS_NAMES = ("background", "disc", "triangle", "bar")
DEFAULT_SIZE = 48
_SPLIT_CODES = {"train": 0, "val": 1}


def _split_code(split):
    if split not in _SPLIT_CODES:
        raise ValueError(f"synthetic datasets have splits {sorted(_SPLIT_CODES)}, got {split!r}")
    return _SPLIT_CODES[split]


def _size_hw(img_size):
    return parse_size(img_size) or [DEFAULT_SIZE, DEFAULT_SIZE]


def shape_masks(kind, cx, cy, radius, angle, yy, xx):
    """Boolean masks of shapes, vectorised over leading dims of the parameters.

    cx, cy, radius, angle broadcast against the pixel grids yy, xx. Sizes are chosen so
    that the three shapes of one radius cover similar areas (area is not a cue).
    """
    dx, dy = xx - cx, yy - cy
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == 1:  # disc
        return u * u + v * v <= radius * radius
    if kind == 2:  # equilateral triangle, circumradius 1.56 r: same area as the disc
        inner = 0.5 * 1.555 * radius
        inside = np.ones(np.broadcast(u, v).shape, dtype=bool)
        for k in range(3):
            phi = 2 * np.pi * k / 3
            inside &= np.cos(phi) * u + np.sin(phi) * v <= inner
        return inside
    if kind == 3:  # bar with aspect 3:1, half sides 1.54 r and 0.51 r: same area as the disc
        return (np.abs(u) <= 1.535 * radius) & (np.abs(v) <= 0.512 * radius)
    raise ValueError(f"unknown shape kind {kind}")


def _colours(rng, n):
    """n RGB colours, all classes and the background from one distribution."""
    return rng.uniform(30, 225, size=(n, 3))


def _distinct_colour(rng, avoid):
    """An object colour at least 60 (L-inf, 0-255) away from each colour in `avoid`.

    Without this an object can vanish into the background, which makes labels unlearnable
    noise; the colour distribution stays the same for every class.
    """
    candidates = _colours(rng, 16)
    far = (np.abs(candidates[:, None, :] - avoid[None]).max(-1) >= 60).all(1)
    return candidates[np.argmax(far)] if far.any() else 255.0 - avoid[0]


def _texture(rng, yy, xx, angle):
    """A multiplicative texture in [0.7, 1.3]: stripes at a random angle/frequency, or speckle."""
    if rng.random() < 0.5:
        freq = rng.uniform(0.5, 1.2)
        return 1.0 + 0.3 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    return 1.0 + rng.uniform(-0.3, 0.3, size=yy.shape)


class SyntheticShapes(torch.utils.data.Dataset):
    """RGB shapes on clutter. Items: x float32 [3, H, W] (VOC normalisation), y int64 [H, W] in 0..3."""

    num_classes = len(CLASS_NAMES)
    # Object radius as a fraction of the shorter image side. DeepLab predicts at 1/4 resolution, so at the
    # small sizes that train in minutes on a CPU a shape must span several output cells to be segmentable.
    radius_range = (0.22, 0.32)

    def __init__(self, split="train", num_samples=None, img_size=None, seed=0, max_objects=2):
        self.split_code = _split_code(split)
        self.num_samples = int(num_samples if num_samples is not None else (400 if split == "train" else 100))
        self.height, self.width = _size_hw(img_size)
        self.seed = int(seed)
        self.max_objects = max_objects
        self.yy, self.xx = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)

    def __len__(self):
        return self.num_samples

    def _background(self, rng):
        h, w = self.height, self.width
        ends = _colours(rng, 2)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * self.xx / w + np.sin(angle) * self.yy / h
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
        img = ends[0] + ramp[..., None] * (ends[1] - ends[0])
        # Clutter: small rectangles and thin lines in the same colours; smaller than any object.
        for _ in range(rng.integers(4, 9)):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            if rng.random() < 0.5:
                img[y0 : y0 + rng.integers(1, 4), x0 : x0 + rng.integers(1, 4)] = _colours(rng, 1)[0]
            else:
                horizontal = rng.random() < 0.5
                length = rng.integers(w // 6, w // 3)
                if horizontal:
                    img[y0, x0 : x0 + length] = _colours(rng, 1)[0]
                else:
                    img[y0 : y0 + length, x0] = _colours(rng, 1)[0]
        return img, ends

    def _place(self, rng, kind, label, tries=4):
        """Mask of a new object that barely overlaps earlier ones (whole shapes are the cue), or None."""
        scale = min(self.height, self.width)
        for _ in range(tries):
            radius = rng.uniform(*self.radius_range) * scale
            cx = rng.uniform(radius, self.width - radius)
            cy = rng.uniform(radius, self.height - radius)
            mask = shape_masks(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi), self.yy, self.xx)
            if (label[mask] > 0).mean() < 0.05:
                return mask
        return None

    def generate(self, index):
        """(rgb float64 [H, W, 3] on 0-255, label int64 [H, W]) for one index."""
        rng = np.random.default_rng((self.seed, self.split_code, int(index)))
        img, ends = self._background(rng)
        label = np.zeros((self.height, self.width), dtype=np.int64)
        for _ in range(rng.integers(1, self.max_objects + 1)):
            kind = int(rng.integers(1, self.num_classes))
            mask = self._place(rng, kind, label)
            if mask is None:
                continue
            colour = _distinct_colour(rng, ends)
            tex = _texture(rng, self.yy, self.xx, rng.uniform(0, np.pi))
            img[mask] = colour * tex[mask][:, None]
            label[mask] = kind
        img += rng.normal(0, 6, size=img.shape)
        return np.clip(img, 0, 255), label

    def __getitem__(self, index):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rgb, label = self.generate(index)
        x = normalize_image(torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32)))
        return x, torch.from_numpy(label)


class SyntheticEvents(torch.utils.data.Dataset):
    """Moving textured shapes seen by a simulated event camera, DDD17 layout.

    Items: x float32 [C, H, W] (or [T, C, H, W] with thl) of the chosen channels, each
    min-max scaled to [-0.5, 0.5] per frame; y int64 [H, W] in 0..3 (the last frame's label).
    num_samples counts sequences of seq_len frames each.
    """

    num_classes = len(CLASS_NAMES)
    substeps = 4  # sub-steps per frame used to simulate events and timestamps
    contrast_threshold = 0.15  # log-intensity change per event

    def __init__(
        self,
        split="train",
        num_samples=None,
        img_size=None,
        seed=0,
        channels=(0, 1),
        thl=False,
        timesteps=8,
        seq_len=20,
        max_objects=2,
        noise_rate=0.01,
    ):
        self.split_code = _split_code(split)
        self.num_sequences = int(num_samples if num_samples is not None else (24 if split == "train" else 6))
        self.height, self.width = _size_hw(img_size)
        self.seed = int(seed)
        self.channels = check_channels(channels)
        self.thl = bool(thl)
        self.timesteps = int(timesteps) if thl else 1
        self.seq_len = int(seq_len)
        if self.timesteps > self.seq_len:
            raise ValueError(f"timesteps {self.timesteps} exceeds the sequence length {self.seq_len}")
        self.max_objects = max_objects
        self.noise_rate = noise_rate
        self.yy, self.xx = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        # With THL the first T-1 frames of a sequence are history only, never targets.
        self.targets_per_sequence = self.seq_len - self.timesteps + 1

    def __len__(self):
        return self.num_sequences * self.targets_per_sequence

    def _sequence(self, seq):
        """Deterministic parameters of one sequence."""
        rng = np.random.default_rng((self.seed, self.split_code, int(seq), 7))
        scale = min(self.height, self.width)
        objects = []
        for _ in range(rng.integers(1, self.max_objects + 1)):
            radius = rng.uniform(0.16, 0.26) * scale
            speed, heading = rng.uniform(1.0, 2.5), rng.uniform(0, 2 * np.pi)
            objects.append(
                dict(
                    kind=int(rng.integers(1, self.num_classes)),
                    radius=radius,
                    pos=np.array([rng.uniform(radius, self.width - radius), rng.uniform(radius, self.height - radius)]),
                    vel=speed * np.array([np.cos(heading), np.sin(heading)]),
                    angle=rng.uniform(0, 2 * np.pi),
                    spin=rng.uniform(-0.05, 0.05),
                    brightness=rng.uniform(0.3, 1.0),
                    freq=rng.uniform(0.6, 1.2),
                    phase=rng.uniform(0, 2 * np.pi),
                )
            )
        background = rng.uniform(0.3, 1.0) * (
            1 + 0.2 * np.sin(rng.uniform(0.1, 0.4) * self.xx + rng.uniform(0.1, 0.4) * self.yy)
        )
        return objects, background

    def _positions(self, obj, times):
        """Object centres at `times`, bouncing off the borders (closed form, so frames are independent)."""
        r = obj["radius"]
        lo = np.array([r, r])
        span = np.array([self.width - 2 * r, self.height - 2 * r])
        z = (obj["pos"] - lo) + times[:, None] * obj["vel"]
        w = np.mod(z, 2 * span)
        return lo + span - np.abs(w - span)

    def _render(self, objects, background, times):
        """Intensity [n, H, W] and label [n, H, W] at each time in `times`."""
        n = len(times)
        intensity = np.broadcast_to(background, (n, self.height, self.width)).copy()
        label = np.zeros((n, self.height, self.width), dtype=np.int64)
        yy, xx = self.yy[None], self.xx[None]
        for obj in objects:
            centre = self._positions(obj, times)
            cx, cy = centre[:, 0, None, None], centre[:, 1, None, None]
            angle = (obj["angle"] + obj["spin"] * times)[:, None, None]
            mask = shape_masks(obj["kind"], cx, cy, obj["radius"], angle, yy, xx)
            # Stripes attached to the object: they move with it, so its interior fires events.
            u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
            tex = obj["brightness"] * (1 + 0.5 * np.sin(obj["freq"] * u + obj["phase"]))
            intensity = np.where(mask, tex, intensity)
            label = np.where(mask, obj["kind"], label)
        return intensity, label

    def frames(self, seq, first, last):
        """Event frames [last-first+1, 6, H, W] (float32) and the label of frame `last`."""
        objects, background = self._sequence(seq)
        k = self.substeps
        times = np.arange((first - 1) * k, last * k + 1) / k
        intensity, labels = self._render(objects, background, times)
        change = np.diff(np.log(intensity + 0.05), axis=0)  # [n*k, H, W]
        change = change.reshape(last - first + 1, k, self.height, self.width)
        pos = np.floor(np.maximum(change, 0) / self.contrast_threshold)
        neg = np.floor(np.maximum(-change, 0) / self.contrast_threshold)
        for i, frame in enumerate(range(first, last + 1)):
            # Sensor noise seeded per frame, so a frame is the same alone or inside a THL window.
            noise_rng = np.random.default_rng((self.seed, self.split_code, int(seq), frame, 11))
            pos[i] += noise_rng.random(pos[i].shape) < self.noise_rate
            neg[i] += noise_rng.random(neg[i].shape) < self.noise_rate
        stamp = ((np.arange(k) + 1) / k)[None, :, None, None]
        out = np.empty((last - first + 1, 6, self.height, self.width), dtype=np.float32)
        for offset, counts in ((0, pos), (1, neg)):
            total = counts.sum(1)
            safe = np.maximum(total, 1)
            mean = (counts * stamp).sum(1) / safe
            var = (counts * (stamp - mean[:, None]) ** 2).sum(1) / safe
            out[:, offset] = total
            out[:, 2 + 2 * offset] = mean
            out[:, 3 + 2 * offset] = np.sqrt(var)
        return out, labels[-1]

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        seq, target = divmod(int(index), self.targets_per_sequence)
        last = target + self.timesteps - 1
        events, label = self.frames(seq, last - self.timesteps + 1, last)
        x = scale_events(torch.from_numpy(events[:, list(self.channels)]))
        return (x if self.thl else x[0]), torch.from_numpy(label)

    def raw_events(self, seq, frame_us, rows_below=0):
        """Raw events (x, y, t, p; t in microseconds from the sequence start) of one SyntheticEvents sequence
        and the label of every frame. Events follow log-intensity changes between the K sub-steps of each
        frame interval (one event per contrast threshold crossed, spread evenly inside the sub-step) plus
        uniform noise; `rows_below` extra sensor rows under the image see only noise."""
        objects, background = self._sequence(seq)
        k = self.substeps
        n_frames = self.seq_len
        times = np.arange(0, n_frames * k + 1) / k  # frame f at time f, sub-steps between
        intensity, labels = self._render(objects, background, times)
        change = np.diff(np.log(intensity + 0.05), axis=0)  # [n_frames * k, H, W]
        rng = np.random.default_rng((self.seed, self.split_code, int(seq), 13))
        step_us = frame_us / k
        xs, ys, ts, ps = [], [], [], []
        height = self.height + rows_below
        for s in range(change.shape[0]):
            counts = np.floor(np.abs(change[s]) / self.contrast_threshold).astype(np.int64)
            yy, xx = np.nonzero(counts)
            n = counts[yy, xx]
            if n.size:
                rep_y, rep_x = np.repeat(yy, n), np.repeat(xx, n)
                rank = np.concatenate([np.arange(1, m + 1) / (m + 1) for m in n])
                xs.append(rep_x)
                ys.append(rep_y)
                ts.append(s * step_us + rank * step_us)
                ps.append((change[s][rep_y, rep_x] > 0).astype(np.int64))
            noise = rng.random((height, self.width)) < self.noise_rate
            ny, nx = np.nonzero(noise)
            xs.append(nx)
            ys.append(ny)
            ts.append(s * step_us + rng.random(nx.size) * step_us)
            ps.append(rng.integers(0, 2, nx.size))
        x, y, t, p = (np.concatenate(a) for a in (xs, ys, ts, ps))
        t = np.floor(t).astype(np.int64)
        order = np.argsort(t, kind="stable")
        return dict(x=x[order], y=y[order], t=t[order], p=p[order]), labels[::k]


def _samples(cfg, split):
    return cfg["num_train" if split == "train" else "num_val"]


def build_shapes(cfg, split):
    return SyntheticShapes(
        split, num_samples=_samples(cfg, split), img_size=cfg.get("img_size"), seed=cfg.get("seed", 0)
    )


def build_events(cfg, split):
    if cfg["raw_events"]:  # the same shapes as raw events in the DSEC layout, read by the dsec-semantic code
        require_hdf5plugin()  # before a temporary folder is made for them
        generator = SyntheticEvents(
            split,
            num_samples=_samples(cfg, split),
            img_size=cfg.get("img_size"),
            seed=cfg.get("seed", 0),
            seq_len=int(cfg["seq_len"]),
        )
        return synthetic_raw.build(generator, split, event_common.settings_from_cfg(cfg))
    return SyntheticEvents(
        split,
        num_samples=_samples(cfg, split),
        img_size=cfg.get("img_size"),
        seed=cfg.get("seed", 0),
        channels=cfg["channels"],
        thl=bool(cfg["thl"]),
        timesteps=int(cfg.get("timesteps", 1)),
        seq_len=int(cfg["seq_len"]),
    )


def events_in_channels(cfg):
    return event_common.in_channels_of(cfg) if cfg["raw_events"] else len(cfg["channels"])


def check_events(cfg):
    check_channels(cfg["channels"])
    if cfg["thl"] and not cfg["raw_events"] and cfg.get("timesteps", 1) > cfg["seq_len"]:
        raise ValueError(
            f"thl with synthetic-events needs timesteps <= seq_len, got {cfg['timesteps']} > {cfg['seq_len']}"
        )


SHAPES_SPEC = DatasetSpec(
    name="synthetic",
    build=build_shapes,
    classes=CLASS_NAMES,
    palette=tuple(SYNTHETIC_PALETTE),
    modality=IMAGES,
    in_channels=3,
    needs_root=False,
    keys=(NUM_TRAIN, NUM_VAL),
    synthetic=True,
)
EVENTS_SPEC = DatasetSpec(
    name="synthetic-events",
    build=build_events,
    classes=CLASS_NAMES,
    palette=tuple(SYNTHETIC_PALETTE),
    modality=EVENTS,
    in_channels=events_in_channels,
    needs_root=False,
    keys=(
        NUM_TRAIN,
        NUM_VAL,
        CHANNELS,
        Key("seq_len", "data", 20, int, "synthetic-events: frames per sequence", interval=POSITIVE),
        Key(
            "raw_events", "data", False, bool, "synthetic-events: raw events in the DSEC layout, read as dsec-semantic"
        ),
        *event_common.KEYS,
    ),
    check=check_events,
    synthetic=True,
)
