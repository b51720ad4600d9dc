"""Operation counts and energy per image of ANN and SNN segmentation networks (45 nm CMOS, Horowitz 2014).

ANN: every convolution runs densely, one multiply-accumulate (MAC) per weight use:
    Conv2d           H_out * W_out * C_out * C_in * kh * kw / groups
    ConvTranspose2d  H_in  * W_in  * C_in * C_out * kh * kw / groups   (each input scattered to its k^2 taps;
                     the output-size form would also count the zeros a stride-2 upsampling inserts)

SNN: a layer whose input is spikes (values in {-1, 0, 1}) only works when a spike arrives; each spike costs one
accumulate (AC) per synapse it reaches: synaptic operations (SOPs) = sum over spikes of its fan-out. The fan-out
is counted exactly, border included: the number of output positions the spike reaches times C_out / groups.
Average pooling between a spiking layer and a conv is linear, so on hardware it folds into that conv's weights:
the spikes of the layer before the pool are the events, and their fan-out is the set of conv outputs they reach
through pool and conv together. A layer fed analog values (direct encoding, THL event frames, the FCN score map
into the first transposed conv) does dense MACs at every step whose input is not all zero.
DeepLab's output conv runs once on the time-mean of the last spikes (a linear shortcut); on neuromorphic
hardware it would take the spikes at every step, and that is how it is counted here.
For comparison each spiking layer also reports ``sops_rate_estimate``, the usual literature shortcut: the input
firing rate (non-zero fraction of the spike map) x the layer's dense MACs x steps; it ignores borders and treats
the pooled map as if it were as sparse as the spikes before the pool.

Not counted (as in the paper's estimate): biases, BN (folded into the weights at inference), membrane updates,
pooling on its own, bilinear resizes and the FCN skip additions.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

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


def is_spikes(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x.abs() == 1)).all())


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
    """Forward hooks that count MACs and SOPs of every conv while the model runs; use as a context manager.

    ``steps`` is the number of time-folded steps per sample ([N*steps, C, H, W]); by default the model's
    simulated steps (``timesteps + extra_steps``) for a spiking SegmentationNet, 1 otherwise. ``readout_conv``
    (default ``model.output`` of a spiking net) is a conv applied to the time-mean: it is counted on the spikes
    of the last neuron layer instead.
    """

    def __init__(self, model: nn.Module, steps: int = None, spiking: bool = None, readout_conv: nn.Module = None):
        self.model = model
        self.spiking = bool(getattr(model, "spiking", False)) if spiking is None else spiking
        if steps is None:
            steps = int(model.timesteps) + int(getattr(model, "extra_steps", 0)) if self.spiking else 1
        self.steps = steps
        if readout_conv is None and self.spiking:
            readout_conv = getattr(model, "output", None)
        self.readout_conv = readout_conv
        self.layers = {}
        self._handles = []
        self._pool_outputs = {}  # id(output) -> (pool module, its input); kept only during one forward
        self._fanout_cache = {}
        self._last_spikes = None

    # ------------------------------------------------------------------------------------------ hooks
    def __enter__(self):
        from models.neurons import Neuron

        self._handles.append(self.model.register_forward_pre_hook(self._start_forward))
        for name, module in self.model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                kind = "conv_transpose" if isinstance(module, nn.ConvTranspose2d) else "conv"
                self.layers[module] = LayerCount(name, kind)
                self._handles.append(module.register_forward_hook(self._count_conv))
            elif isinstance(module, nn.AvgPool2d):
                self._handles.append(module.register_forward_hook(self._note_pool))
            elif isinstance(module, Neuron):
                self._handles.append(module.register_forward_hook(self._note_spikes))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pool_outputs.clear()
        self._last_spikes = None

    def _start_forward(self, module, args):
        self._pool_outputs.clear()
        self._last_spikes = None

    def _note_pool(self, module, inputs, output):
        self._pool_outputs[id(output)] = (module, inputs[0], output)

    def _note_spikes(self, module, inputs, output):
        self._last_spikes = output

    def _count_conv(self, module, inputs, output):
        layer = self.layers[module]
        x = inputs[0]
        if module is self.readout_conv:
            if self._last_spikes is None:
                raise ValueError(f"readout conv '{layer.name}' ran before any neuron layer: nothing to count")
            x = self._last_spikes
            output_hw = output.shape[-2:]
        else:
            output_hw = output.shape[-2:]
        samples = x.shape[0] // self.steps
        layer.images += samples
        source, chain = x, [module]
        while id(source) in self._pool_outputs and self._pool_outputs[id(source)][2] is source:
            pool, pool_input, _ = self._pool_outputs[id(source)]
            source, chain = pool_input, [pool] + chain
        if self.spiking and is_spikes(source):
            self._count_events(layer, module, source, chain, output_hw)
            # the common literature estimate, for comparison: input firing rate x dense MACs x steps
            rate = float((source != 0).sum()) / source.numel()
            layer.sops_rate_estimate += (
                rate * dense_macs(module, inputs[0].shape[1:], output.shape[1:]) * self.steps * samples
            )
        else:
            self._count_dense(layer, module, x, output, samples)

    # ------------------------------------------------------------------------------------------ counts
    def _count_events(self, layer, module, source, chain, output_hw):
        layer.input = "spikes"
        layer.via = [type(m).__name__ for m in chain[:-1]]
        events = (source != 0).sum(dim=(0, 1), dtype=torch.float64)  # [H, W], over samples, steps, channels
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
                out_hw = output_hw if index == len(chain) - 1 else self._pool_out_hw(module, size)
                for axis, op in enumerate(axis_ops(module, out_hw)):
                    chains_hw[axis].append(op)
                size = out_hw
            self._fanout_cache[key] = fanout_map(in_hw, chains_hw)
        return self._fanout_cache[key]

    @staticmethod
    def _pool_out_hw(pool, in_hw):
        k, s, p = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
        return tuple((in_hw[a] + 2 * p[a] - k[a]) // s[a] + 1 for a in (0, 1))

    def _count_dense(self, layer, module, x, output, samples):
        layer.input = "analog"
        per_step = dense_macs(module, x.shape[1:], output.shape[1:])
        if module is self.readout_conv or not self.spiking:
            active = samples * (self.steps if module is self.readout_conv else 1)
        else:  # steps whose input is all zero (full propagation's tail) need no work
            active = int((x.flatten(1) != 0).any(dim=1).sum())  # one row per (timestep, sample)
        layer.macs += float(per_step * active)

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
