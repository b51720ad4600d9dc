"""ANN-to-SNN conversion by threshold balancing (docs/design.md, section 8).

    snn = convert_ann(ann, timesteps=64)                          # BN folded, IF neurons, thresholds 1.0
    snn = convert_ann(ann, 64, neuron="if", reset="zero")         # the same with a hard reset
    raw = calibrate_thresholds(snn, batches, 'channel')           # layer by layer, as the paper's code
    apply_thresholds(snn, raw, 'channel', scaling_factor=0.7)

The ANN's (affine-free) BN is folded into each conv's weight and bias, every ReLU becomes an IF/LIF neuron
(``neuron`` 'lif' with ``leak_mem``, 1.0 by default, or 'if': the registered neurons whose class declares
``converts``) with reset by subtraction (or to zero,
``reset`` 'zero'), and the thresholds come from the input currents the partly converted SNN
produces on calibration batches. Like the paper's code, calibration keeps the earlier layers at their raw
(unscaled) thresholds and the scaling factor is applied only when the SNN is used; so the raw thresholds
are what a checkpoint caches (``thresholds[type][str(T)]``), independent of the scaling factor.

Spike amplitude. A neuron with threshold theta fires at rate ~ a / theta for an ANN activation a, so its
spikes stand for a only when they carry the weight theta. We fold that amplitude into the weights that
read the spikes (next conv, skip scores, output conv, next decoder up-conv), per channel; then every
layer's input current approximates the ANN's pre-activation, folded-BN biases included, and channel-wise
thresholds do not distort the next layer. Neuron-wise thresholds cannot be folded into a convolution:
they get their channel's mean as amplitude (an approximation). ``fold_amplitude=False`` gives the
paper's unit spikes (exact only for layer-wise thresholds and bias-free convs, up to a scale).

Residual networks: layers whose spikes meet at a sum (a residual ADD) take one threshold, the largest of
their group, so that the sum's readers are scaled once (the shortcut's activation is scaled with the
block's, as the conversion literature does for ResNets); max pooling of spikes is their OR, which fires at
least as often as the busiest input (an approximation of the ANN's max). A layer without a conversion rule
(models/protocol.py) is refused before anything is built.

Thresholds are lists in the order the signal reaches the spiking layers (``spiking_layers``): a float
per layer ('layer'), a ``[C]`` tensor ('channel') or a ``[C, H, W]`` tensor ('neuron').
"""

import math

import torch
from tqdm import tqdm

from common.keys import parse_size

from .architectures import build_architecture
from .config import resolve_model_config
from .graph import layer_graph
from .network import SegmentationNet
from .neurons import conversion_neurons
from .protocol import NotSupported

THRESHOLD_TYPES = ("layer", "channel", "neuron")
CONVERSION_ENCODERS = ("poisson", "direct")


def fold_batchnorm(unit):
    """(weight, bias) of one conv that computes conv -> BN of ``unit`` (BN in inference mode).

    BN(y) = (y - mean) * scale with scale = gamma / sqrt(var + eps), so the folded conv has weight
    W * scale (per output channel) and bias (b - mean) * scale. Computed in float64.
    """
    if unit.norm is not None and unit.norm.running_mean.shape[0] != 1:
        raise ValueError(
            f"BN folding needs the ANN's single-step BN, got statistics for "
            f"{unit.norm.running_mean.shape[0]} timesteps (is this an SNN?)"
        )
    return unit.folded()


def snn_config(
    ann_cfg: dict,
    timesteps: int,
    leak_mem: float = 1.0,
    encoder: str = "poisson",
    neuron: str = "lif",
    reset: str = "subtract",
) -> dict:
    """The converted SNN's config: the ANN's, with IF/LIF neurons, no BN and conv biases (folded BN)."""
    if neuron not in conversion_neurons():  # the neuron class declares it (Neuron.converts)
        raise ValueError(f"conversion builds neurons {conversion_neurons()}, got neuron {neuron!r}")
    if encoder not in CONVERSION_ENCODERS:
        raise ValueError(f"conversion encoder must be one of {list(CONVERSION_ENCODERS)}, got {encoder!r}")
    if int(timesteps) < 1:
        raise ValueError(f"conversion timesteps must be >= 1, got {timesteps}")
    cfg = {
        **ann_cfg,
        "model_type": "snn",
        "timesteps": int(timesteps),
        "leak_mem": float(leak_mem),
        "neuron": neuron,
        "reset": reset,
        "bn": False,
        "conv_bias": True,
        "encoder": encoder,
        "readout": "mean",
        "full_prop": False,
        "def_threshold": 1.0,
        "pretrained": None,
    }
    if "thl" in ann_cfg:  # a run's config: the converted SNN reads single frames, never a history
        cfg["thl"] = False
    return cfg


def conversion_problems(ann: SegmentationNet) -> list:
    """'layer NAME: why' for each layer of ``ann`` that conversion cannot handle (empty: it converts)."""
    problems = [f"layer {name}: {problem}" for name, part in ann.parts() if (problem := part.conversion_problem())]
    try:
        layer_graph(ann, _image_size(ann) or (64, 64)).check("conversion")
    except NotSupported as err:
        problems.append(str(err))
    return problems


def convert_ann(
    ann: SegmentationNet,
    timesteps: int,
    leak_mem: float = 1.0,
    encoder: str = "poisson",
    neuron: str = "lif",
    reset: str = "subtract",
) -> SegmentationNet:
    """A fresh SNN with the ANN's weights (BN folded); thresholds stay at 1.0 until calibrated.
    ``neuron`` 'lif' (leak ``leak_mem``) or 'if' (no leak); ``reset`` 'subtract' or 'zero'. Every layer says
    how its weights convert (``Part.conversion_state``); one that cannot is a ValueError naming it."""
    if ann.spiking:
        raise ValueError("conversion needs an ANN (model_type 'ann'), got an SNN")
    problems = conversion_problems(ann)
    if problems:
        raise NotSupported(f"{problems[0]} (ANN-to-SNN conversion)")
    config = snn_config(ann.config, timesteps, leak_mem, encoder, neuron, reset)
    snn = build_architecture(resolve_model_config(config, ann.config))
    ann_state = ann.state_dict()
    state = {k: ann_state[k].detach().clone() for k in snn.state_dict() if k in ann_state}
    for name, part in ann.parts():
        state.update(part.conversion_state(f"{name}."))
    for key, value in snn.state_dict().items():
        if key.endswith("act.threshold") or key not in state:
            state[key] = value
    snn.load_state_dict(state)
    return snn.to(next(ann.parameters()).device).eval()


# ------------------------------------------------------------------------------------- calibration
class _LayerReached(Exception):
    """Raised by the calibration hook: the layer of interest has its input; the rest is not needed."""


def current_statistic(current: torch.Tensor, threshold_type: str, percentile=None):
    """Max (or nearest-rank percentile) of one batch's input currents ``[N*T, C, H, W]``.

    'layer' -> 0-d tensor, 'channel' -> [C] (over samples, timesteps and positions),
    'neuron' -> [C, H, W] (over samples and timesteps).
    """
    _check_type(threshold_type)
    channels = current.shape[1]
    if threshold_type == "layer":
        values, dim = current.reshape(-1), 0
    elif threshold_type == "channel":
        values, dim = current.transpose(0, 1).reshape(channels, -1), 1
    else:
        values, dim = current.reshape(current.shape[0], -1), 0
    if percentile is None:
        stat = values.amax(dim)
    else:
        count = values.shape[dim]
        rank = min(max(math.ceil(float(percentile) / 100 * count), 1), count)
        stat = values.kthvalue(rank, dim).values
    return stat.view(current.shape[1:]) if threshold_type == "neuron" else stat


def _positive(stat: torch.Tensor, layer_name: str) -> torch.Tensor:
    """Neurons that never got a positive current cannot take 0 as threshold: give them the layer's max."""
    positive = stat > 0
    if positive.all():
        return stat
    fill = stat.max() if positive.any() else stat.new_tensor(1.0)
    if not positive.any():
        tqdm.write(f"warning: layer {layer_name} got no positive input current in calibration; threshold 1.0")
    return torch.where(positive, stat, fill)


class Wiring:
    """How a converted SNN's spikes travel, from its layer graph: its neuron layers in the order the signal
    reaches them, the convolutions that read each one's spikes (``readers``: module, input-channel dim,
    source neurons), and the groups of neuron layers whose spikes meet at a sum (a residual ADD), which must
    share one spike amplitude for the sum's readers to be scaled once."""

    def __init__(self, snn: SegmentationNet):
        graph = layer_graph(snn, _image_size(snn) or (64, 64))
        graph.check("conversion")
        self.neurons = graph.neurons()
        self.readers = []
        leader = {n: n for n in self.neurons}

        def find(n):
            while leader[n] is not n:
                n = leader[n]
            return n

        for _, synapse, activity in graph.synapse_inputs():
            sources = [s for s in self.neurons if s in activity.sources]
            if sources:
                self.readers.append((synapse.module, synapse.in_dim, sources))
                for other in sources[1:]:
                    leader[find(other)] = find(sources[0])
        self.group = {n: [m for m in self.neurons if find(m) is find(n)] for n in self.neurons}

    @staticmethod
    def of(snn: SegmentationNet) -> "Wiring":
        """The SNN's wiring, found once and kept with it."""
        if "_conversion_wiring" not in snn.__dict__:
            snn.__dict__["_conversion_wiring"] = Wiring(snn)
        return snn.__dict__["_conversion_wiring"]


def spiking_layers(snn: SegmentationNet) -> list:
    """The neuron layers in the order thresholds are listed: the order the signal reaches them."""
    return Wiring.of(snn).neurons


@torch.no_grad()
def calibrate_thresholds(
    snn: SegmentationNet,
    batches,
    threshold_type: str = "layer",
    percentile=None,
    show_progress: bool = True,
    fold_amplitude: bool = True,
) -> list:
    """Raw thresholds of every spiking layer, found layer by layer as in the paper's code.

    For layer k, layers 1..k-1 carry their raw thresholds already; the SNN runs on each batch of
    ``batches`` (inputs ``[N, C, H, W]``) and layer k's input current at every timestep is reduced to
    its max (or ``percentile``), layer-, channel- or neuron-wise; over several batches the maxima are
    combined by max, the percentiles by their mean. Layers whose spikes meet at a residual sum take the
    largest threshold of their group (elementwise), the shortcut's activation scaled with the block's.
    """
    _check_type(threshold_type)
    if percentile is not None and not 0 < float(percentile) <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of the training split")
    snn.eval()
    wiring = Wiring.of(snn)
    raw = {}
    for lif in tqdm(wiring.neurons, desc=f"{threshold_type} thresholds", leave=False, disable=not show_progress):
        stats = []

        def record(module, args):
            stats.append(current_statistic(args[0].detach(), threshold_type, percentile))
            raise _LayerReached

        handle = lif.register_forward_pre_hook(record)
        try:
            for x in batches:
                try:
                    snn(x)
                except _LayerReached:
                    pass
        finally:
            handle.remove()
        stacked = torch.stack(stats)
        stat = stacked.amax(0) if percentile is None else stacked.mean(0)
        stat = _positive(stat, lif.name)
        raw[lif] = float(stat) if threshold_type == "layer" else stat.float().cpu()
        _tie(raw, wiring.group[lif])
        # the next layers see this one converted (raw thresholds, as in the paper's code)
        _set_thresholds(snn, raw, threshold_type, 1.0, fold_amplitude)
    return [raw[lif] for lif in wiring.neurons]


def _tie(raw: dict, group: list):
    """The calibrated members of a group of layers that share a spike amplitude take their largest threshold."""
    members = [n for n in group if n in raw]
    if len(members) > 1:
        values = [torch.as_tensor(raw[n]) for n in members]
        tied = torch.stack(values).amax(0)
        for n in members:
            raw[n] = float(tied) if tied.dim() == 0 else tied.clone()


def _as_threshold(raw, threshold_type):
    value = torch.as_tensor(raw, dtype=torch.float32)
    return value.view(-1, 1, 1) if threshold_type == "channel" else value


def apply_thresholds(
    snn: SegmentationNet,
    thresholds: list,
    threshold_type: str,
    scaling_factor: float = 0.7,
    fold_amplitude: bool = True,
):
    """Set each spiking layer's threshold (and spike amplitude) to raw threshold x scaling_factor."""
    check_thresholds(thresholds, snn, threshold_type, "thresholds")
    if scaling_factor <= 0:
        raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
    raw = dict(zip(spiking_layers(snn), thresholds))
    _set_thresholds(snn, raw, threshold_type, float(scaling_factor), fold_amplitude)


def _set_thresholds(snn, raw: dict, threshold_type, scale, fold_amplitude):
    """Thresholds raw x scale of the layers in ``raw``; the weights that read their spikes carry the
    amplitude (per input channel; None: unit spikes)."""
    amplitudes = {}
    for lif, value in raw.items():
        threshold = _as_threshold(value, threshold_type) * scale
        lif.set_threshold(threshold)
        amplitudes[lif] = threshold.mean((1, 2)) if threshold_type == "neuron" else threshold.reshape(-1)
    _scale_readers(snn, amplitudes if fold_amplitude else {})


def _scale_readers(snn, amplitudes: dict):
    """Reader weights = unscaled (as converted) weights x the amplitude of the spikes they read."""
    unscaled = snn.__dict__.setdefault("_unscaled_reader_weights", {})
    for module, dim, sources in Wiring.of(snn).readers:
        base = unscaled.setdefault(id(module), module.weight.detach().clone())
        amplitude = next((amplitudes[s] for s in sources if s in amplitudes), None)
        if amplitude is None:
            factor = 1.0
        else:
            shape = [1] * base.dim()
            shape[dim] = -1
            factor = amplitude.to(base).view(shape) if amplitude.numel() > 1 else amplitude.to(base).reshape(())
        with torch.no_grad():
            module.weight.copy_(base * factor)


def check_thresholds(thresholds, snn: SegmentationNet, threshold_type: str, source: str):
    """ValueError naming ``source`` if ``thresholds`` do not fit the SNN's spiking layers."""
    _check_type(threshold_type)
    layers = spiking_layers(snn)
    if not isinstance(thresholds, (list, tuple)) or len(thresholds) != len(layers):
        found = len(thresholds) if isinstance(thresholds, (list, tuple)) else type(thresholds).__name__
        raise ValueError(
            f"{source}: expected a list of {len(layers)} per-layer thresholds (one per spiking "
            f"layer of {snn.arch}), found {found}"
        )
    size = _image_size(snn)
    shapes = _layer_shapes(snn, size or (64, 64))
    for index, (raw, shape) in enumerate(zip(thresholds, shapes)):
        value = torch.as_tensor(raw)
        expected = {"layer": (), "channel": shape[:1], "neuron": shape}[threshold_type]
        fits = tuple(value.shape) == tuple(expected)
        if threshold_type == "neuron" and size is None:  # native image size: only the channels are known
            fits = value.dim() == 3 and value.shape[0] == expected[0]
        if not fits:
            raise ValueError(
                f"{source}: {threshold_type} threshold of layer {index} has shape "
                f"{tuple(value.shape)}, expected {tuple(expected)} (other image size or arch?)"
            )
        if not torch.isfinite(value).all() or (value <= 0).any():
            raise ValueError(f"{source}: threshold of layer {index} must be finite and > 0")


def _image_size(snn: SegmentationNet):
    """(H, W) of the configured input, or None for native (varying) sizes."""
    size = parse_size(snn.config.get("img_size"))
    return None if size is None else tuple(size)


@torch.no_grad()
def _layer_shapes(snn: SegmentationNet, size):
    """[C, H, W] of each spiking layer's input for images of ``size`` (one dummy timestep)."""
    shapes = []

    def record(module, args):
        shapes.append(tuple(args[0].shape[1:]))

    height, width = size
    handles = [lif.register_forward_pre_hook(record) for lif in spiking_layers(snn)]
    saved = snn.timesteps
    try:
        snn.timesteps = 1
        device = next(snn.parameters()).device
        snn.eval()(torch.zeros(1, int(snn.config["in_channels"]), height, width, device=device))
    finally:
        snn.timesteps = saved
        for handle in handles:
            handle.remove()
    return shapes


def _check_type(threshold_type):
    if threshold_type not in THRESHOLD_TYPES:
        raise ValueError(f"unknown threshold type {threshold_type!r}; choose one of {list(THRESHOLD_TYPES)}")


# --------------------------------------------------------------------------------- checkpoint cache
def cached_thresholds(checkpoint: dict, threshold_type: str, timesteps: int, settings: dict):
    """The raw thresholds cached for (type, T) if they were found with the same ``settings``, else None.

    Thresholds without recorded settings (e.g. imported from the paper's repository) are trusted.
    """
    found = (checkpoint.get("thresholds") or {}).get(threshold_type, {})
    if not isinstance(found, dict) or str(timesteps) not in found:
        return None
    recorded = (checkpoint.get("threshold_settings") or {}).get(threshold_type, {}).get(str(timesteps))
    if recorded is not None and recorded != settings:
        return None
    return list(found[str(timesteps)])


def store_thresholds(checkpoint: dict, threshold_type: str, timesteps: int, thresholds: list, settings: dict):
    """Nest ``thresholds`` as checkpoint['thresholds'][type][str(T)] (and how they were found)."""
    for key, value in (("thresholds", list(thresholds)), ("threshold_settings", dict(settings))):
        table = checkpoint.get(key)
        if not isinstance(table, dict):
            table = checkpoint[key] = {}
        if not isinstance(table.get(threshold_type), dict):
            table[threshold_type] = {}
        table[threshold_type][str(timesteps)] = value
    return checkpoint
