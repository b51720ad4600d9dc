"""Event representations: the events (x, y, t, p) of one window -> float32 [B, C, H, W], as ESS builds them.

ESS (Sun et al. ECCV 2022, github uzh-rpg/ess) has two loaders, and their arithmetic differs; each dataset
follows its own (`loader`), so that items equal ESS's to float32 rounding (tests/test_data_ess_equal.py):

    'dsec'   ESS's DSEC loader (the DSEC scripts' VoxelGrid): timestamps normalised in float32, coordinates
             (rectified, fractional) spread bilinearly from their integer part, weights and sums in float32.
    'ddd17'  ESS's DDD17 loader: timestamps normalised in float64 (from int64 nanoseconds), integer
             coordinates, positive and negative events summed into two grids.

    voxel      B bins (Zhu et al. 2019): an event at tn = (B-1)(t - t_first)/(t_last - t_first) adds
               (1 - |b - tn|) to bins b = floor(tn), floor(tn)+1; +1 / -1 by polarity (C = 1), or +1 in
               two channels, positive then negative (C = 2, `separate_polarity`).
    histogram  per-polarity counts, negative then positive (ESS's order, C = 2), of B parts of the window
               (`parts`: ESS cuts a window into parts and builds one histogram per part).
    evsegnet   Ev-SegNet's 6 channels per slice (ours: ESS has none): positive count, negative count, mean
               and std of the positive timestamps, of the negative ones (timestamps in [0, 1] over the window).

Defects of ESS's code that the published numbers include are kept when `exact` is true (the default of the
datasets' `ess_exact`); exact=False corrects them (docs/data.md lists them):
    - DSEC voxel: coordinates are truncated toward zero, not floored, so an event rectified to x in (-2, 0)
      (or y) puts weights 1 - |x| and x on columns 0 and 1 (negative for x < 0); corrected: floor.
    - DSEC voxel: a window whose events share one timestamp is all zeros (0/0 drops every event);
      corrected: every event in bin 0.
    - DSEC histogram: coordinates are truncated and the flat index x + W*y wraps (an event at x = -1 counts
      at the end of the previous row, y = -1 on the last row); corrected: floor, events off the frame dropped.
    - DDD17 time windows: the events at the last instant of the window are dropped (see `parts`).
    - DDD17 `nonzero` normalisation: std as sqrt(E[x^2] - mean^2) in float32 (which can be a rounding residue);
      corrected: the exact std. Where ESS's std is 0 (every non-zero entry equal) ESS returns NaN; both give
      the entries minus their mean instead.
An empty window is all zeros (ESS's loaders fail on it).

Normalisation (`normalize`): 'nonzero' (ESS's `normalize_event`: the non-zero entries minus their mean, divided
by their std; zeros stay zero; over the whole voxel grid, and over each part of a histogram: ESS normalises
each part it builds), 'minmax' (each channel of each bin to [-0.5, 0.5], the repository's Ev-SegNet scaling)
or 'none'.
"""

import numpy as np
import torch

REPRESENTATIONS = ("voxel", "histogram", "evsegnet")
NORMALIZATIONS = ("nonzero", "minmax", "none")
LOADERS = ("dsec", "ddd17")


def channels_per_bin(representation, separate_polarity=False, channels=None):
    if representation == "voxel":
        return 2 if separate_polarity else 1
    if representation == "histogram":
        return 2
    if representation == "evsegnet":
        return len(channels) if channels is not None else 6
    raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")


# ----------------------------------------------------------------------------- voxel grids
def voxel_grid(x, y, t, p, bins, height, width, separate_polarity=False, loader="dsec", exact=True):
    """[B, 1, H, W] (signed) or [B, 2, H, W] (positive, negative) float32, in the arithmetic of `loader`."""
    c = 2 if separate_polarity else 1
    t = np.asarray(t, dtype=np.int64)
    if not t.size:
        return np.zeros((bins, c, height, width), dtype=np.float32)
    if loader == "dsec":
        grid = _voxel_dsec(x, y, t, p, bins, height, width, separate_polarity, exact)
    elif loader == "ddd17":
        grid = _voxel_ddd17(x, y, t, p, bins, height, width, separate_polarity)
    else:
        raise ValueError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    return np.ascontiguousarray(grid.reshape(c, bins, height, width).transpose(1, 0, 2, 3))


def _voxel_dsec(x, y, t, p, bins, height, width, separate, exact):
    """[C*B*H*W] float32 (polarity-major). Float32 throughout, the weights' factors multiplied left to right
    and summed in ESS's order (corner by corner, then event by event), so the sums round as ESS's do."""
    rel = (t - t[0]).astype(np.float32)
    if rel[-1] == 0 and exact:  # ESS divides 0 by 0: every timestamp NaN, every event dropped
        return np.zeros((2 if separate else 1) * bins * height * width, dtype=np.float32)
    tn = rel / rel[-1] if rel[-1] != 0 else np.zeros_like(rel)
    if rel[-1] != 0:
        tn = (np.float32(bins - 1) * (tn - tn[0])) / (tn[-1] - tn[0])
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    rounding = np.trunc if exact else np.floor
    x0, y0 = rounding(x).astype(np.int64), rounding(y).astype(np.int64)
    t0 = tn.astype(np.int64)  # tn >= 0: truncation is the floor
    positive = np.asarray(p) > 0
    if separate:
        value = np.ones(t.size, dtype=np.float32)
        offset = np.where(positive, 0, bins * height * width)
    else:
        value = np.where(positive, np.float32(1), np.float32(-1))
        offset = 0
    times = [(ti, 1 - np.abs(ti.astype(np.float32) - tn), ti < bins) for ti in (t0, t0 + 1)]
    indices, weights = [], []
    for xi in (x0, x0 + 1):
        vx = value * (1 - np.abs(xi.astype(np.float32) - x))
        ok_x = (xi >= 0) & (xi < width)
        for yi in (y0, y0 + 1):
            vxy = vx * (1 - np.abs(yi.astype(np.float32) - y))
            ok_xy = ok_x & (yi >= 0) & (yi < height)
            pixel = offset + yi * width + xi
            for ti, wt, ok_t in times:
                ok = ok_xy & ok_t
                indices.append((pixel + ti * (height * width))[ok])
                weights.append((vxy * wt)[ok])
    grid = np.zeros((2 if separate else 1) * bins * height * width, dtype=np.float32)
    np.add.at(grid, np.concatenate(indices), np.concatenate(weights))
    return grid


def _voxel_ddd17(x, y, t, p, bins, height, width, separate):
    """[C*B*H*W] float32 (polarity-major): times normalised in float64 from int64, weights summed into
    float32 grids, positive and negative events apart (signed = positive - negative), each grid's sums in
    ESS's order (every event's left weight, then every right weight). ESS adds its float64 weights to the
    float32 sums one by one (NumPy's slow mixed-type path); here they are rounded to float32 first, which can
    differ from ESS's sums in the last bit where several events meet."""
    plane = bins * height * width
    span = t[-1] - t[0]
    tn = ((bins - 1) * (t - t[0])) / (span if span else 1.0)
    t0 = tn.astype(np.int64)
    right = tn - t0
    left = (1.0 - right).astype(np.float32)
    x, y, p = (np.asarray(a, dtype=np.int64) for a in (x, y, p))
    index = x + y * width + t0 * (height * width) + np.where(p > 0, 0, plane)
    ok = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    nxt = ok & (t0 + 1 < bins)
    grid = np.zeros(2 * plane, dtype=np.float32)
    np.add.at(
        grid,
        np.concatenate([index[ok], index[nxt] + height * width]),
        np.concatenate([left[ok], right[nxt].astype(np.float32)]),
    )
    return grid if separate else grid[:plane] - grid[plane:]


# ----------------------------------------------------------------------------- histograms
def histogram(x, y, p, height, width, truncate=False):
    """[2, H, W] float32 counts: negative events, then positive (ESS's order). truncate: ESS's DSEC
    arithmetic on fractional (rectified) coordinates: truncated, flat index wrapped (see the module
    docstring); else floored and dropped off the frame."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    size = height * width
    if truncate:
        flat = np.trunc(x).astype(np.int64) + width * np.trunc(y).astype(np.int64)
        keep = (flat >= -size) & (flat < size)  # beyond that ESS's indexing fails; here they are dropped
        flat = flat % size
    else:
        xi, yi = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
        keep = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        flat = xi + width * yi
    plane = (np.asarray(p) > 0).astype(np.int64)
    counts = np.bincount((plane * size + flat)[keep], minlength=2 * size)
    return counts.reshape(2, height, width).astype(np.float32)


def parts(t, k, rule, window=None, exact=True):
    """(start, stop) index pairs of the k parts ESS cuts a window's events (sorted timestamps t) into:

    'count'  ESS's event-count windows: k runs of len(t) // k events; ESS drops the remainder (the newest
             len(t) % k events); exact=False spreads them over the runs instead.
    'span'   ESS's DDD17 time windows: parts of d = int((t_last - t_first) / k) from the first event; ESS
             ends the last part at t_first + k*d, so the events at the window's last instant (and any
             after k*d) are dropped, for any k (a voxel grid is one part); exact=False keeps them.
    'window' ESS's DSEC time windows: the k equal parts of the window (start, end) = `window`, with ESS's
             float64 arithmetic (start + i * (end - start) / k).
    """
    t = np.asarray(t, dtype=np.int64)
    n = t.size
    if rule == "count":
        bounds = [i * (n // k) for i in range(k + 1)] if exact else [(i * n) // k for i in range(k + 1)]
    elif rule == "span":
        if not n:
            return [(0, 0)] * k
        d = int((t[-1] - t[0]) / k)
        bounds = [0] + [int(np.searchsorted(t, t[0] + (i + 1) * d, side="left")) for i in range(k)]
        if not exact:
            bounds[-1] = n
    elif rule == "window":
        start, end = int(window[0]), int(window[1])
        step = (end - start) / k
        edges = np.array([np.float64(start) + i * step for i in range(k + 1)])
        bounds = np.searchsorted(t.astype(np.float64), edges, side="left").tolist()
    else:
        raise ValueError(f"rule must be count, span or window, got {rule!r}")
    return list(zip(bounds[:-1], bounds[1:]))


# ----------------------------------------------------------------------------- Ev-SegNet channels
def _slices(t, bins):
    """Slice index 0..B-1 of each event: B equal parts of [t_first, t_last] (the last event in B-1)."""
    t = np.asarray(t, dtype=np.int64)
    if t.size == 0:
        return t
    span = t[-1] - t[0]
    if span <= 0:
        return np.zeros(t.size, dtype=np.int64)
    return np.minimum(np.floor(bins * (t - t[0]) / span), bins - 1).astype(np.int64)


def evsegnet(x, y, t, p, bins, height, width, t_start=None, t_end=None, channels=None):
    """[B, 6 or len(channels), H, W] float32: Ev-SegNet's channels per slice; timestamps in [0, 1] over
    [t_start, t_end] (default: the first and last event); fractional coordinates count at their floor."""
    t = np.asarray(t, dtype=np.int64)
    out = np.zeros((bins, 6, height * width), dtype=np.float64)
    if t.size:
        lo = int(t[0]) if t_start is None else int(np.floor(t_start))
        hi = int(t[-1]) if t_end is None else int(np.ceil(t_end))
        tn = (t - lo) / (hi - lo) if hi > lo else np.zeros(t.size)
        xi = np.floor(np.asarray(x, dtype=np.float64)).astype(np.int64)
        yi = np.floor(np.asarray(y, dtype=np.float64)).astype(np.int64)
        ok = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
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


# ----------------------------------------------------------------------------- normalisation
def normalize(x, mode, loader="dsec", exact=True):
    """Normalise an array (see the module docstring); 'nonzero' over the whole array. loader 'dsec': std
    with n-1 (torch's, as ESS's DSEC loader); 'ddd17': ESS's DDD17 formula, sqrt(E[x^2] - mean^2) in
    float32 (exact=False: the exact std with n)."""
    if mode == "none":
        return x
    if mode == "nonzero":
        out = np.array(x, dtype=np.float32, copy=True)
        flat = out.reshape(-1)
        index = np.flatnonzero(flat)
        if index.size:
            values = flat[index]
            if loader == "dsec":  # torch's mean and std of the non-zero entries, as ESS's
                mean, std = torch.from_numpy(values).mean(), torch.from_numpy(values).std()
            elif exact:  # ESS's sums over the whole array, in float32
                whole = torch.from_numpy(flat)
                mean = whole.sum() / np.float32(index.size)
                std = torch.sqrt((whole**2).sum() / np.float32(index.size) - mean**2)
            else:
                mean, std = values.astype(np.float64).mean(), values.astype(np.float64).std()
            mean, std = np.float32(mean), np.float32(std)
            flat[index] = (values - mean) / std if std > 0 else values - mean
        return out
    if mode == "minmax":
        lo = x.min(axis=(-2, -1), keepdims=True)
        hi = x.max(axis=(-2, -1), keepdims=True)
        span = hi - lo
        scaled = (x - lo) / np.where(span > 0, span, 1) - 0.5
        return np.where(span > 0, scaled, 0).astype(np.float32)
    raise ValueError(f"event_norm must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")
