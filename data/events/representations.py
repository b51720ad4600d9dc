"""Event representations: events (x, y, t, p) of one window -> float32 [B, C, H, W].

B is the number of time bins, C the channels of one bin. A dataset feeds the B bins either as the
SNN's timesteps (one bin per timestep, the 'sequence' encoder, items [B, C, H, W]) or as channels of
one frame (items [B*C, H, W], bin-major: channel b*C + c).

    voxel_grid   events spread bilinearly over B time bins (Zhu et al. 2019, as ESS builds it): an
                 event at normalised time tn = (B-1)(t - t_first)/(t_last - t_first) adds its value
                 (1-|b - tn|) to bins b = floor(tn), floor(tn)+1. Value: +1 / -1 by polarity (C = 1),
                 or two channels, positive then negative, each counting +1 (C = 2). Coordinates may be
                 fractional (rectified DSEC events): they are spread bilinearly over the 4 nearest pixels,
                 as ESS's DSEC loader does; integer coordinates land on their own pixel.
    histogram    per-polarity event counts (C = 2: positive, negative) in B equal slices of the window.
    evsegnet     Ev-SegNet's 6 channels per slice: positive count, negative count, positive mean and std
                 of the timestamps, negative mean and std (timestamps normalised to [0, 1] over the window).

Timestamps are normalised by the window's first and last event (ESS). All events at one instant:
every event is at tn = 0. An empty window is all zeros.

Normalisation (`normalize`): 'nonzero' (ESS / Spike-BRGNet `normalize_event`: the non-zero entries of
the whole [B, C, H, W] tensor minus their mean, divided by their std; zeros stay zero), 'minmax' (each
channel of each bin to [-0.5, 0.5], the repository's Ev-SegNet scaling) or 'none'.
"""

import numpy as np

REPRESENTATIONS = ("voxel", "histogram", "evsegnet")
NORMALIZATIONS = ("nonzero", "minmax", "none")


def channels_per_bin(representation, separate_polarity=False, channels=None):
    if representation == "voxel":
        return 2 if separate_polarity else 1
    if representation == "histogram":
        return 2
    if representation == "evsegnet":
        return len(channels) if channels is not None else 6
    raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")


def normalized_time(t, bins):
    """(B-1) * (t - t_first) / (t_last - t_first), float64; 0 for every event when the span is 0."""
    t = np.asarray(t, dtype=np.float64)
    if t.size == 0:
        return t
    span = t[-1] - t[0]
    if span <= 0:
        return np.zeros_like(t)
    return (bins - 1) * (t - t[0]) / span


def voxel_grid(x, y, t, p, bins, height, width, separate_polarity=False):
    """[B, 1, H, W] (signed) or [B, 2, H, W] (positive, negative) float32."""
    c = 2 if separate_polarity else 1
    p = np.asarray(p)
    if not p.size:
        return np.zeros((bins, c, height, width), dtype=np.float32)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    tn = normalized_time(t, bins)
    x0, y0, t0 = np.floor(x), np.floor(y), np.floor(tn)
    fx, fy, ft = x - x0, y - y0, tn - t0
    x0, y0, t0 = x0.astype(np.int64), y0.astype(np.int64), t0.astype(np.int64)
    # plane of each event in bin t0: [B, C] flattened; the value carries the polarity's sign when C = 1
    plane = t0 * c + ((p == 0) if separate_polarity else 0)
    value = np.ones_like(ft) if separate_polarity else np.where(p > 0, 1.0, -1.0)
    indices, weights = [], []
    for dx, wx in ((0, 1 - fx), (1, fx)):
        xi = x0 + dx
        ok_x = (xi >= 0) & (xi < width)
        for dy, wy in ((0, 1 - fy), (1, fy)):
            yi = y0 + dy
            ok_xy = ok_x & (yi >= 0) & (yi < height)
            pixel = yi * width + xi
            for db, wt in ((0, 1 - ft), (1, ft)):
                w = value * wx * wy * wt
                ok = ok_xy & (t0 + db < bins) & (w != 0)
                indices.append((plane[ok] + db * c) * (height * width) + pixel[ok])
                weights.append(w[ok])
    size = bins * c * height * width
    grid = np.bincount(np.concatenate(indices), weights=np.concatenate(weights), minlength=size)
    return grid.reshape(bins, c, height, width).astype(np.float32)


def _slices(t, bins):
    """Slice index 0..B-1 of each event: B equal parts of [t_first, t_last] (the last event in B-1)."""
    t = np.asarray(t, dtype=np.float64)
    if t.size == 0:
        return t.astype(np.int64)
    span = t[-1] - t[0]
    if span <= 0:
        return np.zeros(t.size, dtype=np.int64)
    return np.minimum(np.floor(bins * (t - t[0]) / span), bins - 1).astype(np.int64)


def _pixel(x, y, height, width):
    """Integer pixel of each (possibly fractional) coordinate (floor) and whether it is on the image."""
    xi = np.floor(np.asarray(x, dtype=np.float64)).astype(np.int64)
    yi = np.floor(np.asarray(y, dtype=np.float64)).astype(np.int64)
    return xi, yi, (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)


def histogram(x, y, t, p, bins, height, width):
    """[B, 2, H, W] float32 counts (positive, negative) per time slice; fractional coordinates floor."""
    size = bins * 2 * height * width
    xi, yi, ok = _pixel(x, y, height, width)
    plane = _slices(t, bins) * 2 + (np.asarray(p) == 0)
    out = np.bincount(((plane * height + yi) * width + xi)[ok], minlength=size).astype(np.float64)
    return out.reshape(bins, 2, height, width).astype(np.float32)


def evsegnet(x, y, t, p, bins, height, width, t_start=None, t_end=None, channels=None):
    """[B, 6 or len(channels), H, W] float32: Ev-SegNet's channels per slice; timestamps in [0, 1] over
    [t_start, t_end] (default: the first and last event)."""
    t = np.asarray(t, dtype=np.float64)
    out = np.zeros((bins, 6, height * width), dtype=np.float64)
    if t.size:
        lo = t[0] if t_start is None else float(t_start)
        hi = t[-1] if t_end is None else float(t_end)
        tn = (t - lo) / (hi - lo) if hi > lo else np.zeros_like(t)
        xi, yi, ok = _pixel(x, y, height, width)
        s = _slices(t, bins)
        pix = yi * width + xi
        for k, positive in enumerate((True, False)):
            sel = ok & ((np.asarray(p) > 0) == positive)
            idx = s[sel] * height * width + pix[sel]
            n = np.bincount(idx, minlength=bins * height * width)
            s1 = np.bincount(idx, weights=tn[sel], minlength=bins * height * width)
            s2 = np.bincount(idx, weights=tn[sel] ** 2, minlength=bins * height * width)
            safe = np.maximum(n, 1)
            mean = s1 / safe
            var = np.maximum(s2 / safe - mean**2, 0.0)
            out[:, k] = n.reshape(bins, -1)
            out[:, 2 + 2 * k] = mean.reshape(bins, -1)
            out[:, 3 + 2 * k] = np.sqrt(var).reshape(bins, -1)
    out = out.reshape(bins, 6, height, width)
    if channels is not None:
        out = out[:, list(channels)]
    return out.astype(np.float32)


def normalize(x, mode, unbiased=True):
    """Normalise a [B, C, H, W] array (see the module docstring). unbiased: std with n-1 (ESS's DSEC
    loader, torch's default) or n (ESS's DDD17 loader)."""
    if mode == "none":
        return x
    if mode == "nonzero":
        x = np.array(x, dtype=np.float32, copy=True)
        flat = x.reshape(-1)
        index = np.flatnonzero(flat)
        if index.size:
            values = flat[index].astype(np.float64)
            mean = values.mean()
            std = values.std(ddof=1) if unbiased and index.size > 1 else values.std()
            flat[index] = ((values - mean) / std) if std > 0 else values - mean
        return x
    if mode == "minmax":
        lo = x.min(axis=(-2, -1), keepdims=True)
        hi = x.max(axis=(-2, -1), keepdims=True)
        span = hi - lo
        scaled = (x - lo) / np.where(span > 0, span, 1) - 0.5
        return np.where(span > 0, scaled, 0).astype(np.float32)
    raise ValueError(f"event_norm must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")


def represent(events, representation, bins, height, width, separate_polarity=False, channels=None, window=None):
    """The representation of a window's events (dict with x, y, t, p) as float32 [B, C, H, W].
    window: (t_start, t_end) of a fixed-duration window (the Ev-SegNet timestamps use it)."""
    x, y, t, p = (events[k] for k in ("x", "y", "t", "p"))
    if representation == "voxel":
        return voxel_grid(x, y, t, p, bins, height, width, separate_polarity)
    if representation == "histogram":
        return histogram(x, y, t, p, bins, height, width)
    if representation == "evsegnet":
        start, end = window if window is not None else (None, None)
        return evsegnet(x, y, t, p, bins, height, width, start, end, channels)
    channels_per_bin(representation)  # raises the one-line error
