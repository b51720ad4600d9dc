"""The architecture table: one entry per network, read by both the ANN and the SNN builder.

Each entry has the ``features`` and ``classifier`` parts of the paper's code (kept apart only so that
checkpoints of the paper's repository map onto ours); the builder reads them as one sequence.
Tokens:

- ``conv(c, k=3, d=1)``: k x k convolution to c channels, dilation d, 'same' padding, no bias;
  followed by BN (BNTT in the SNN) and ReLU / LIF.
- ``POOL2`` / ``POOL1``: average pooling, kernel 3, padding 1, stride 2 / 1.
- ``SCORE``: FCN skip: a 1x1 convolution (with bias) to the classes, taken from the spikes at this point.
- ``OUTPUT``: DeepLab's 1x1 output convolution, no BN, no activation (the non-spiking readout).
"""

from dataclasses import dataclass


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

ARCHITECTURES = {
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


def get_architecture(name: str) -> dict:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{name}'; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def is_fcn(name: str) -> bool:
    return any(isinstance(token, Score) for part in get_architecture(name).values() for token in part)
