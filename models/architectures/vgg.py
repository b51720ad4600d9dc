"""The paper's VGG networks: spiking (and analog) DeepLab and FCN, written as tables.

Each table has the ``features`` and ``classifier`` parts of the paper's code (kept apart only so that
checkpoints of the paper's repository map onto ours); ``VGGNet`` reads them as one sequence. Tokens:

- ``conv(c, k=3, d=1)``: k x k convolution to c channels, dilation d, 'same' padding, no bias;
  followed by BN (BNTT in the SNN) and ReLU / LIF.
- ``POOL2`` / ``POOL1``: average pooling, kernel 3, padding 1, stride 2 / 1.
- ``SCORE``: FCN skip: a 1x1 convolution (with bias) to the classes, taken from the spikes at this point.
- ``OUTPUT``: DeepLab's 1x1 output convolution, no BN, no activation (the non-spiking readout).

Another plain chain is one more table and one ``register_architecture`` line at the bottom.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..network import SegmentationNet
from ..parts import AvgPool, ConvUnit, SkipScore
from . import register_architecture


@dataclass(frozen=True)
class Conv:
    channels: int
    kernel: int = 3
    dilation: int = 1

    @property
    def padding(self):
        return self.dilation * (self.kernel - 1) // 2


@dataclass(frozen=True)
class Pool:
    stride: int


@dataclass(frozen=True)
class Score:
    pass


@dataclass(frozen=True)
class Output:
    pass


def conv(channels, kernel=3, dilation=1):
    return Conv(channels, kernel, dilation)


POOL1, POOL2, SCORE, OUTPUT = Pool(1), Pool(2), Score(), Output()

_VGG16_TO_1_8 = [
    conv(64),
    conv(64),
    POOL2,
    conv(128),
    conv(128),
    POOL2,
    conv(256),
    conv(256),
    conv(256),
    POOL2,
    conv(512),
    conv(512),
    conv(512),
    POOL1,
]

TABLES = {
    "dl-vgg9": dict(
        features=[
            conv(64),
            conv(64),
            POOL2,
            conv(128),
            conv(128),
            POOL2,
            conv(256),
            conv(256, dilation=2),
            conv(256, dilation=2),
        ],
        classifier=[conv(1024, dilation=12), OUTPUT],
    ),
    "dl-vgg11": dict(
        features=[
            conv(64),
            POOL2,
            conv(128),
            POOL2,
            conv(256),
            conv(256),
            POOL2,
            conv(512),
            conv(512),
            POOL1,
            conv(512, dilation=2),
            conv(512, dilation=2),
        ],
        classifier=[conv(1024, dilation=12), conv(1024, kernel=1), OUTPUT],
    ),
    "dl-vgg16": dict(
        features=_VGG16_TO_1_8 + [conv(512, dilation=2)] * 3,
        classifier=[conv(1024, dilation=12), conv(1024, kernel=1), OUTPUT],
    ),
    "fcn-vgg9": dict(
        features=[
            conv(64),
            conv(64),
            SCORE,
            POOL2,
            conv(128),
            conv(128),
            SCORE,
            POOL2,
            conv(256),
            conv(256),
            conv(256),
            SCORE,
            POOL2,
        ],
        classifier=[conv(1024), conv(1024), SCORE],
    ),
    # Not in the paper: VGG16's 13 convolutions kept at 1/8 resolution, with the FCN decoder of fcn-vgg9.
    "fcn-vgg16": dict(
        features=[
            conv(64),
            conv(64),
            SCORE,
            POOL2,
            conv(128),
            conv(128),
            SCORE,
            POOL2,
            conv(256),
            conv(256),
            conv(256),
            SCORE,
            POOL2,
            conv(512),
            conv(512),
            conv(512),
            POOL1,
            conv(512),
            conv(512),
            conv(512),
        ],
        classifier=[conv(1024), conv(1024), SCORE],
    ),
}


class VGGNet(SegmentationNet):
    """A VGG table as a network: ``body`` (conv units, pooling and FCN skip scores in table order), and
    either DeepLab's ``output`` convolution (the head, applied to the time-mean) or the FCN ``decoder``.

    The readout's input is the last spikes (DeepLab) or the decoder's sum (FCN). The state-dict keys
    (``body.<i>``, ``output``, ``decoder.<k>``) are those of every checkpoint this project has written.
    """

    def build(self, cfg, parts, table):
        classes, channels = int(cfg["num_classes"]), int(cfg["in_channels"])
        self.table = table
        self.body = nn.ModuleList()
        self.output = None
        # Body positions of each part's conv units: the paper's 'features.<i>' / 'classifier.<i>'.
        self.part_units = {"features": [], "classifier": []}
        for part in ("features", "classifier"):
            for token in table[part]:
                if isinstance(token, Conv):
                    self.part_units[part].append(len(self.body))
                    self.body.append(parts.conv_unit(channels, token.channels, token.kernel, dilation=token.dilation))
                    channels = token.channels
                elif isinstance(token, Pool):
                    self.body.append(parts.avg_pool(3, stride=token.stride, padding=1))
                elif isinstance(token, Score):
                    self.body.append(parts.skip_score(channels, classes))
                elif isinstance(token, Output):
                    self.output = parts.readout(channels, classes)
        for unit in self._full_resolution_units():
            unit.recompute = True
        self.decoder = nn.ModuleList()
        self.fcn = is_fcn(table)
        if self.fcn:
            stages = sum(isinstance(m, SkipScore) for m in self.body) - 1
            for k in range(stages):
                self.decoder.append(parts.decoder_stage(classes, spiking=k < stages - 1))

    @classmethod
    def min_input_size(cls, table):
        """2 per stride-2 pooling."""
        return 2 ** sum(1 for part in table.values() for token in part if isinstance(token, Pool) and token.stride == 2)

    def readout_head(self):
        return self.output

    def full_prop_steps(self):
        """One zero-input step per layer of the main chain (its convolutions and the output), as the paper's
        code counts them."""
        return sum(isinstance(t, (Conv, Output)) for part in self.table.values() for t in part)

    def _full_resolution_units(self):
        """The conv units before the first pooling."""
        units = []
        for layer in self.body:
            if isinstance(layer, AvgPool):
                break
            if isinstance(layer, ConvUnit):
                units.append(layer)
        return units

    def forward_steps(self, h):
        skips = []
        for layer in self.body:
            if isinstance(layer, SkipScore):
                skips.append(layer(h))
            else:
                h = layer(h)
        if self.fcn:
            h = skips[-1]
            for stage, skip in zip(self.decoder, reversed(skips[:-1])):
                h = stage(h, skip)
        return h

    def picture_layer(self):
        """(name, module) of the layer the run's picture shows: the last conv unit at full resolution
        (before the first pooling), whose activity lines up with the input pixels."""
        unit = self._full_resolution_units()[-1]
        return next(n for n, m in self.named_modules() if m is unit), unit

    def paper_skip_positions(self):
        """(body index, part, convs of that part before it) of each FCN skip: the paper's dict key."""
        first_classifier = min(self.part_units["classifier"], default=len(self.body))
        positions = []
        for body_index, layer in enumerate(self.body):
            if isinstance(layer, SkipScore):
                part = "features" if body_index < first_classifier else "classifier"
                count = sum(1 for unit in self.part_units[part] if unit < body_index)
                positions.append((body_index, part, count))
        return positions

    def load_pretrained(self, path: str):
        """Start the backbone from torchvision ImageNet VGG weights in a local file (no download).

        Conv weights are copied in order where shapes agree (a first layer for event input is kept);
        the VGG biases are dropped since the paper's convs have none. Returns the names of the units
        that were copied and of those left at their initialisation.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"pretrained weights file '{path}' does not exist") from None
        except Exception as exc:  # one line: not PyTorch's advice to load it with weights_only=False
            text = str(exc)
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            reason = reason.group(1).strip() if reason else (text.splitlines() or [type(exc).__name__])[0]
            raise ValueError(
                f"pretrained weights '{path}' are not a weights-only PyTorch file (torch.load with weights_only=True: "
                f"{reason}; nothing in it was run)"
            ) from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"pretrained weights '{path}' hold a {type(state).__name__}, not a dict of weights")
        vgg = [v for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4]
        if not vgg:
            raise ValueError(f"'{path}' holds no torchvision VGG 'features.<i>.weight' conv weights")
        copied, kept = [], []
        for index, weight in zip(self.part_units["features"], vgg):
            unit = self.body[index]
            if unit.conv.weight.shape == weight.shape:
                with torch.no_grad():
                    unit.conv.weight.copy_(weight)
                copied.append(f"body.{index}")
            else:
                kept.append(f"body.{index}")
        return copied, kept


def is_fcn(table) -> bool:
    return any(isinstance(token, Score) for part in table.values() for token in part)


for _name, _table in TABLES.items():
    register_architecture(_name, table=_table)(VGGNet)
