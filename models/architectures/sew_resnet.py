"""SEW-ResNet-18 (Fang et al., NeurIPS 2021, "Deep Residual Learning in Spiking Neural Networks") as a
spiking DeepLab and a spiking FCN, with their ANN twins.

The backbone is SpikingJelly's ``sew_resnet18`` with ADD connections: a stem (7x7 convolution, stride 2,
BN, neurons, 3x3 max pooling, stride 2) and four stages of two basic blocks (64, 128, 256, 512 channels).
A block is conv3x3 -> BN -> neurons -> conv3x3 -> BN -> neurons, plus its input (or, where the shape
changes, conv1x1 -> BN -> neurons of its input): the sum of two spike maps, integer levels 0..2 and more
as blocks chain. In the ANN twin the neurons are ReLUs and the shortcut adds activations.

- ``dl-sew-resnet18``: DeepLab (output stride 8): stages 3 and 4 dilated (2, then 4) instead of strided,
  the first block of each taking the previous dilation, as torchvision's ResNets do; then a 3x3
  convolution of dilation 12 to 256 channels (BN, neurons) and the 1x1 readout on the time-mean.
- ``fcn-sew-resnet18``: the strided backbone (output stride 32) with FCN skip scores after the stem
  (1/2 resolution) and after each stage (1/4 .. 1/32), merged coarsest first by the FCN decoder.
"""

import torch.nn as nn

from ..network import SegmentationNet
from . import register_architecture

STAGES = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two conv units and an ADD of the block's input (or its downsampled copy)."""

    def __init__(self, parts, in_channels, channels, stride=1, dilation=1):
        super().__init__()
        self.conv1 = parts.conv_unit(in_channels, channels, 3, stride=stride, dilation=dilation)
        self.conv2 = parts.conv_unit(channels, channels, 3, dilation=dilation)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = parts.conv_unit(in_channels, channels, 1, stride=stride, padding=0)
        self.add = parts.add()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.add(identity, self.conv2(self.conv1(x)))


class SEWResNet18(SegmentationNet):
    """The backbone and a DeepLab head (``fcn`` False) or FCN skip scores and decoder (``fcn`` True)."""

    def build(self, cfg, parts, fcn):
        classes, channels = int(cfg["num_classes"]), int(cfg["in_channels"])
        self.fcn = fcn
        self.stem = parts.conv_unit(channels, 64, 7, stride=2, padding=3)
        self.maxpool = parts.max_pool(3, stride=2, padding=1)
        dilations = (1, 1, 1, 1) if fcn else (1, 1, 2, 4)
        strides = (1, 2, 2, 2) if fcn else (1, 2, 1, 1)
        in_channels, previous = 64, 1
        for index, (width, stride, dilation) in enumerate(zip(STAGES, strides, dilations), 1):
            first = BasicBlock(parts, in_channels, width, stride, previous)
            setattr(self, f"layer{index}", nn.Sequential(first, BasicBlock(parts, width, width, 1, dilation)))
            in_channels, previous = width, dilation
        if fcn:
            self.scores = nn.ModuleList(parts.skip_score(c, classes) for c in (64, *STAGES))
            self.decoder = nn.ModuleList(parts.decoder_stage(classes, spiking=k < 3) for k in range(4))
        else:
            self.classifier = parts.conv_unit(512, 256, 3, dilation=12)
            self.head = parts.readout(256, classes)
        self.stem.recompute = True  # full resolution / 2: the largest outputs, the cheapest convolution

    @classmethod
    def min_input_size(cls, fcn):
        """Output stride 32 (FCN) or 8 (DeepLab, its last stages dilated)."""
        return 32 if fcn else 8

    def full_prop_steps(self):
        """The conv units on the longest path (stem, two per block, the DeepLab classifier) and the readout."""
        return 17 if self.fcn else 19

    def forward_steps(self, h):
        stem = self.stem(h)
        h = self.layer1(self.maxpool(stem))
        if not self.fcn:
            h = self.layer4(self.layer3(self.layer2(h)))
            return self.classifier(h)
        features = [stem, h]
        for stage in (self.layer2, self.layer3, self.layer4):
            features.append(stage(features[-1]))
        skips = [score(f) for score, f in zip(self.scores, features)]
        h = skips[-1]
        for stage, skip in zip(self.decoder, reversed(skips[:-1])):
            h = stage(h, skip)
        return h

    def picture_layer(self):
        return "stem", self.stem


register_architecture("dl-sew-resnet18", fcn=False)(SEWResNet18)
register_architecture("fcn-sew-resnet18", fcn=True)(SEWResNet18)
