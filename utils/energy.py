"""Operation counts and energy per image of ANN and SNN segmentation networks (45 nm CMOS, Horowitz 2014).

ANN: every convolution runs densely, one multiply-accumulate (MAC) per weight use:
    Conv2d           H_out * W_out * C_out * C_in * kh * kw / groups
    ConvTranspose2d  H_in  * W_in  * C_in * C_out * kh * kw / groups   (each input scattered to its k^2 taps;
                     the output-size form would also count the zeros a stride-2 upsampling inserts)

SNN: what each convolution receives is declared by the layers (models/protocol.py, through the layer graph of
models/graph.py), never guessed from a batch's values. A layer whose input is spikes only works when a spike
arrives; each spike costs one accumulate (AC) per synapse it reaches: synaptic operations (SOPs) = sum over
spikes of its fan-out. A spike of level k (a multi-level neuron, or the sum of k binary spike maps at a
residual ADD) counts k times, as the multi-level papers count it. The fan-out is counted exactly, border
included: the number of output positions the spike reaches times C_out / groups.
Average pooling between a spiking layer and a conv is linear, so on hardware it folds into that conv's weights:
the spikes of the layer before the pool are the events, and their fan-out is the set of conv outputs they reach
through pool and conv together. A layer fed analog values (direct encoding, THL event frames, the FCN score map
into the first transposed conv) does dense MACs at every step whose input is not all zero.
DeepLab's output conv runs once on the time-mean of the last spikes (a linear shortcut); on neuromorphic
hardware it would take the spikes at every step, and that is how it is counted here.
For comparison each spiking layer also reports ``sops_rate_estimate``, the usual literature shortcut: the input
firing rate (non-zero fraction of the spike map) x the layer's dense MACs x steps; it ignores borders and treats
the pooled map as if it were as sparse as the spikes before the pool.

Not counted (as in the paper's estimate): residual additions, biases, BN (folded into the weights at
inference), membrane updates, pooling on its own, bilinear resizes and the FCN skip additions.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common.keys import parse_size
from models.graph import Recorder, layer_graph

MAC_ENERGY_PJ = 4.6  # 32-bit float multiply-add, 45 nm (Horowitz 2014)
AC_ENERGY_PJ = 0.9  # 32-bit float add, 45 nm
PJ_TO_MJ = 1e-9


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@dataclass(frozen=True)
class AxisOp:
    """One spatial axis of a conv / transposed conv / pooling: how input index i maps to output indices."""

    kernel: int
    stride: int
    padding: int
    dilation: int
    out_len: int
    transposed: bool = False

    def targets(self, i: int) -> set:
        """Output indices that input index i contributes to (through any kernel tap)."""
        found = set()
        for tap in range(self.kernel):
            if self.transposed:  # o = i * s - p + tap * d
                o = i * self.stride - self.padding + tap * self.dilation
            else:  # o * s - p + tap * d = i
                shifted = i + self.padding - tap * self.dilation
                if shifted % self.stride:
                    continue
                o = shifted // self.stride
            if 0 <= o < self.out_len:
                found.add(o)
        return found


def axis_ops(module: nn.Module, out_hw) -> tuple:
    """(AxisOp for H, AxisOp for W) of a Conv2d, ConvTranspose2d or AvgPool2d with output size out_hw."""
    transposed = isinstance(module, nn.ConvTranspose2d)
    if isinstance(module, nn.AvgPool2d):
        if module.ceil_mode:
            raise ValueError("fan-out counting supports AvgPool2d with ceil_mode=False only")
        kernel, stride, padding, dilation = (
            _pair(module.kernel_size),
            _pair(module.stride or module.kernel_size),
            _pair(module.padding),
            (1, 1),
        )
    else:
        if isinstance(module.padding, str):
            raise ValueError(f"fan-out counting needs numeric padding, got padding={module.padding!r}")
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    return tuple(AxisOp(kernel[a], stride[a], padding[a], dilation[a], int(out_hw[a]), transposed) for a in (0, 1))


def axis_reach(in_len: int, chain) -> torch.Tensor:
    """For each input index, how many output indices the chain of AxisOps reaches (a set union, not paths)."""
    counts = []
    for i in range(in_len):
        reached = {i}
        for op in chain:
            reached = set().union(*(op.targets(j) for j in reached))
        counts.append(len(reached))
    return torch.tensor(counts, dtype=torch.float64)


def fanout_map(in_hw, chains_hw) -> torch.Tensor:
    """[H, W] spatial fan-out of each input position (kernels are rectangular grids, so H and W separate)."""
    return torch.outer(axis_reach(int(in_hw[0]), chains_hw[0]), axis_reach(int(in_hw[1]), chains_hw[1]))


def dense_macs(module: nn.Module, in_shape, out_shape) -> int:
    """MACs of one dense application to one sample (shapes [C, H, W])."""
    kh, kw = module.kernel_size
    if isinstance(module, nn.ConvTranspose2d):
        c_in, h, w = in_shape
        return h * w * c_in * module.out_channels * kh * kw // module.groups
    c_out, h, w = out_shape
    return h * w * c_out * module.in_channels * kh * kw // module.groups


def synapse_output_hw(module: nn.Module, in_hw) -> tuple:
    """(H, W) out of a Conv2d, ConvTranspose2d or AvgPool2d for inputs of size ``in_hw``."""
    ops = axis_ops(module, (0, 0))
    if isinstance(module, nn.ConvTranspose2d):
        extra = _pair(module.output_padding)
        return tuple(
            (in_hw[a] - 1) * op.stride - 2 * op.padding + op.dilation * (op.kernel - 1) + extra[a] + 1
            for a, op in enumerate(ops)
        )
    return tuple(
        (in_hw[a] + 2 * op.padding - op.dilation * (op.kernel - 1) - 1) // op.stride + 1 for a, op in enumerate(ops)
    )


@dataclass
class LayerCount:
    name: str
    kind: str
    input: str = ""
    macs: float = 0.0
    sops: float = 0.0
    sops_rate_estimate: float = 0.0
    spikes_in: float = 0.0
    images: int = 0
    via: list = field(default_factory=list)

    def per_image(self, mac_pj: float, ac_pj: float) -> dict:
        images = max(self.images, 1)
        macs, sops, spikes = self.macs / images, self.sops / images, self.spikes_in / images
        return {
            "name": self.name,
            "kind": self.kind,
            "input": self.input,
            "via": list(self.via),
            "macs": macs,
            "sops": sops,
            "sops_rate_estimate": self.sops_rate_estimate / images,
            "spikes_in": spikes,
            "mean_fan_out": sops / spikes if spikes else 0.0,
            "energy_mj": (macs * mac_pj + sops * ac_pj) * PJ_TO_MJ,
        }


class OpCounter:
    """Counts the MACs and SOPs of every convolution of a SegmentationNet while it runs (a context manager).

    What each convolution receives comes from the layer graph (models/graph.py): the parts declare it, so a
    residual ADD's output (integer levels), pooled spikes and analog values are each counted as they are,
    whatever the values of a batch. A convolution declared to receive spikes that gets anything but integers
    within the declared levels is an error naming the layer, not a number. A network the graph cannot follow
    is refused when the counter starts, before any data is read.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.spiking = bool(model.spiking)
        self.steps = int(model.timesteps) + int(model.extra_steps) if self.spiking else 1
        self.layers = {}
        self._handles = []
        self._fanout_cache = {}
        self._recorder = None

    # ------------------------------------------------------------------------------------------ hooks
    def __enter__(self):
        size = parse_size(self.model.config.get("img_size")) or (64, 64)
        graph = layer_graph(self.model, size)
        graph.check("the energy count")
        self._nodes = {node.part: node for node in graph.nodes}
        self._activities = {}
        for node, synapse, activity in graph.synapse_inputs():
            name = node.name if len(node.part.synapses()) == 1 else f"{node.name}.{synapse.local}"
            kind = "conv_transpose" if synapse.in_dim == 0 else "conv"
            self.layers[(node.part, synapse.module)] = LayerCount(name, kind)
            self._activities[(node.part, synapse.module)] = activity
        self._recorder = Recorder(self.model).__enter__()
        self._handles.append(self.model.register_forward_hook(self._count_forward))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._recorder is not None:
            self._recorder.__exit__(*exc)
            self._recorder = None

    def _count_forward(self, model, args, output):
        recorder = self._recorder
        for call in recorder.calls:
            for synapse in call.part.synapses():
                key = (call.part, synapse.module)
                x = call.inputs[synapse.input]
                if synapse.on_time_mean:  # counted on what the time-mean was taken of, at every step
                    x = recorder.producer(x).output
                self._count(self.layers[key], self._activities[key], synapse, x, recorder)
        recorder.reset()

    def _count(self, layer, activity, synapse, x, recorder):
        module = synapse.module
        samples = x.shape[0] // self.steps
        layer.images += samples
        out_hw = synapse_output_hw(module, x.shape[-2:])
        if self.spiking and activity.is_spikes:
            layer.input = activity.describe()
            for source, chain, via, term in self._event_terms(x, activity, [module], [], recorder):
                layer.via = via
                self._check_levels(layer, source, term)
                self._count_events(layer, module, source, chain, out_hw)
                rate = float((source != 0).sum()) / source.numel()
                out_shape = (module.out_channels, *out_hw)
                layer.sops_rate_estimate += rate * dense_macs(module, x.shape[1:], out_shape) * self.steps * samples
        else:
            self._count_dense(layer, module, x, out_hw, samples, synapse.on_time_mean)

    def _event_terms(self, x, activity, chain, via, recorder):
        """(spike tensor, fan-out chain, names of the parts passed, its activity) of each term of events in
        ``x``: spikes themselves, or traced back through average pooling (fan-out through the pool) and sums
        (each term's own events) to the spikes they were made of."""
        if activity.integer:
            return [(x, chain, via, activity)]
        call = recorder.producer(x)
        node, how = self._nodes[call.part], call.part.events()
        if how == "pool":
            return self._event_terms(
                call.inputs[0], node.input_activities[0], [call.part] + chain, [call.name] + via, recorder
            )
        if how == "sum":
            terms = []
            for term, term_activity in zip(call.inputs, node.input_activities):
                terms += self._event_terms(term, term_activity, chain, via, recorder)
            return terms
        raise ValueError(f"layer {call.name}: holds pooled spikes but does not say how their events pass (Part.events)")

    def _count_events(self, layer, module, source, chain, output_hw):
        """SOPs: each spike reaches the outputs of its fan-out; a spike of level k counts k times."""
        events = source.detach().abs().sum(dim=(0, 1), dtype=torch.float64)  # [H, W], samples, steps, channels
        fanout = self._spatial_fanout(chain, source.shape[-2:], output_hw)
        channels_reached = module.out_channels // module.groups
        layer.spikes_in += float(events.sum())
        layer.sops += float((events.cpu() * fanout).sum()) * channels_reached

    def _spatial_fanout(self, chain, in_hw, output_hw):
        key = (tuple(id(m) for m in chain), tuple(in_hw), tuple(output_hw))
        if key not in self._fanout_cache:
            chains_hw = ([], [])
            size = tuple(in_hw)
            for index, module in enumerate(chain):
                out_hw = output_hw if index == len(chain) - 1 else synapse_output_hw(module, size)
                for axis, op in enumerate(axis_ops(module, out_hw)):
                    chains_hw[axis].append(op)
                size = out_hw
            self._fanout_cache[key] = fanout_map(in_hw, chains_hw)
        return self._fanout_cache[key]

    def _count_dense(self, layer, module, x, out_hw, samples, on_time_mean):
        """MACs of a convolution fed analog values: at every step whose input is not all zero (full
        propagation's tail is free); a readout on the time-mean at every step."""
        layer.input = "analog"
        per_step = dense_macs(module, x.shape[1:], (module.out_channels, *out_hw))
        if on_time_mean or not self.spiking:
            active = samples * (self.steps if on_time_mean else 1)
        else:
            active = int((x.flatten(1) != 0).any(dim=1).sum())  # one row per (timestep, sample)
        layer.macs += float(per_step * active)

    @staticmethod
    def _check_levels(layer, source, activity):
        """The declaration holds: integer values within the declared levels (and sign)."""
        found = activity.violation(source)
        if found is not None:
            raise ValueError(
                f"layer {layer.name}: declared to receive {activity.describe()}, but its input holds {found!r}: "
                "the layer that makes it declares the wrong activity (Part.activity / Neuron.emits)"
            )

    # ------------------------------------------------------------------------------------------ summary
    def summary(self, mac_pj: float = MAC_ENERGY_PJ, ac_pj: float = AC_ENERGY_PJ) -> dict:
        """{macs, sops, energy_mj, per_layer}: per image, averaged over the images seen."""
        per_layer = [layer.per_image(mac_pj, ac_pj) for layer in self.layers.values() if layer.images]
        macs = sum(row["macs"] for row in per_layer)
        sops = sum(row["sops"] for row in per_layer)
        return {
            "macs": macs,
            "sops": sops,
            "energy_mj": (macs * mac_pj + sops * ac_pj) * PJ_TO_MJ,
            "sops_rate_estimate": sum(row["sops_rate_estimate"] for row in per_layer),
            "mac_energy_pj": mac_pj,
            "ac_energy_pj": ac_pj,
            "per_layer": per_layer,
        }
