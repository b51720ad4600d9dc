"""Spike-BRGNet (Long, Zhu et al., "Spike-BRGNet: Efficient and Accurate Event-based Semantic Segmentation with
Boundary Region-Guided Spiking Neural Networks", IEEE TCSVT 2024; github.com/xiaxinZhu/Spike-BRGNet at
7807866f), equal to the authors' forward pass.

Input: the event voxel grid's bins as timesteps of one channel (``thl``: ``[T=5, N, 1, H, W]``; H and W multiples
of 8). Three branches at 1/8 resolution (detail, boundary, context through a pyramid pooling), fused by
pixel-attention (PagFM) and a boundary-guided fusion (Light_Bag). Outputs, averaged over the timesteps and
resized to the input bilinearly with align_corners=True: ``out``, and in training (or when asked) ``aux`` (the
detail branch's head) and ``boundary`` (one channel). The never-called ``dfm.conv`` (147,712 parameters) is left
out; the state dict otherwise keeps the authors' names. docs/models.md has the numbers and what was checked.
"""

import torch
import torch.nn as nn

from .. import protocol
from ..network import SegmentationNet
from ..parts import Add, AvgPool
from . import register_architecture
from .published_parts import BatchNorm, Concat, Conv, GlobalAvgPool, Resize
from .sltnet import PUBLISHED_NEURON, check_multiple_of_8, check_published_settings


class BasicBlock(nn.Module):
    """conv3x3, BN, neurons, conv3x3, BN, plus the input (or its 1x1 projection); neurons unless last."""

    expansion = 1

    def __init__(self, parts, c_in, planes, stride=1, fire=True):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = Conv(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm(planes)
        self.lif1 = parts.neuron()
        self.conv2 = Conv(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm(planes)
        self.downsample = projection(c_in, c_out, stride)
        self.add = Add()
        self.lif2 = parts.neuron() if fire else None

    def forward(self, x):
        out = self.bn2(self.conv2(self.lif1(self.bn1(self.conv1(x)))))
        out = self.add(out, x if self.downsample is None else self.downsample(x))
        return out if self.lif2 is None else self.lif2(out)


class Bottleneck(nn.Module):
    """1x1, BN, neurons, 3x3 (stride), BN, neurons, 1x1 to twice the width, BN, plus the input; neurons unless
    last."""

    expansion = 2

    def __init__(self, parts, c_in, planes, stride=1, fire=True):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = Conv(c_in, planes, 1, bias=False)
        self.bn1 = BatchNorm(planes)
        self.lif1 = parts.neuron()
        self.conv2 = Conv(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm(planes)
        self.lif2 = parts.neuron()
        self.conv3 = Conv(planes, c_out, 1, bias=False)
        self.bn3 = BatchNorm(c_out)
        self.downsample = projection(c_in, c_out, stride)
        self.add = Add()
        self.lif3 = parts.neuron() if fire else None

    def forward(self, x):
        out = self.lif2(self.bn2(self.conv2(self.lif1(self.bn1(self.conv1(x))))))
        out = self.add(self.bn3(self.conv3(out)), x if self.downsample is None else self.downsample(x))
        return out if self.lif3 is None else self.lif3(out)


def projection(c_in, c_out, stride):
    """The shortcut's 1x1 convolution and BN where the shape changes, else None (the identity)."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(Conv(c_in, c_out, 1, stride, bias=False), BatchNorm(c_out))


def stage(parts, block, c_in, planes, blocks, stride=1):
    """``_make_layer``: the first block strided and ending in neurons, the others too but for the last."""
    layers = [block(parts, c_in, planes, stride, fire=True)]
    for i in range(1, blocks):
        layers.append(block(parts, planes * block.expansion, planes, 1, fire=i < blocks - 1))
    return nn.Sequential(*layers)


def conv_bn(c_in, c_out, kernel=1, padding=0):
    return nn.Sequential(Conv(c_in, c_out, kernel, padding=padding, bias=False), BatchNorm(c_out))


class SegmentHead(nn.Module):
    """BN, neurons, 3x3 convolution, BN, neurons, 1x1 convolution with bias (segmenthead)."""

    def __init__(self, parts, c_in, mid, c_out):
        super().__init__()
        self.bn1 = BatchNorm(c_in)
        self.lif1 = parts.neuron()
        self.conv1 = Conv(c_in, mid, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(mid)
        self.lif2 = parts.neuron()
        self.conv2 = Conv(mid, c_out, 1, bias=True)

    def forward(self, x):
        return self.conv2(self.lif2(self.bn2(self.conv1(self.lif1(self.bn1(x))))))


class PAPPM(nn.Module):
    """Parallel aggregation pyramid pooling: four pooled branches (average pooling 5/9/17 and global), each BN,
    neurons, 1x1, resized and added to the unpooled branch; then a grouped 3x3 over them, and a 1x1 of all
    five plus a 1x1 shortcut."""

    def __init__(self, parts, c_in, branch, c_out):
        super().__init__()
        for i, (kernel, stride, padding) in enumerate(((5, 2, 2), (9, 4, 4), (17, 8, 8)), 1):
            pool = AvgPool(kernel, stride=stride, padding=padding)
            setattr(
                self,
                f"scale{i}",
                nn.Sequential(pool, BatchNorm(c_in), parts.neuron(), Conv(c_in, branch, 1, bias=False)),
            )
        self.scale4 = nn.Sequential(GlobalAvgPool(), BatchNorm(c_in), parts.neuron(), Conv(c_in, branch, 1, bias=False))
        self.scale0 = bn_lif_conv(parts, c_in, branch)
        self.scale_process = bn_lif_conv(parts, branch * 4, branch * 4, kernel=3, padding=1, groups=4)
        self.compression = bn_lif_conv(parts, branch * 5, c_out)
        self.shortcut = bn_lif_conv(parts, c_in, c_out)
        self.resizes = nn.ModuleList(Resize() for _ in range(4))
        self.adds = nn.ModuleList(Add() for _ in range(4))
        self.cat_scales, self.cat_all, self.add = Concat(), Concat(), Add()

    def forward(self, x):
        x0 = self.scale0(x)
        scales = [self.scale1, self.scale2, self.scale3, self.scale4]
        branches = [add(resize(scale(x), x), x0) for scale, resize, add in zip(scales, self.resizes, self.adds)]
        processed = self.scale_process(self.cat_scales(*branches))
        return self.add(self.compression(self.cat_all(x0, processed)), self.shortcut(x))


def bn_lif_conv(parts, c_in, c_out, kernel=1, padding=0, groups=1):
    return nn.Sequential(
        BatchNorm(c_in), parts.neuron(), Conv(c_in, c_out, kernel, padding=padding, groups=groups, bias=False)
    )


class Similarity(protocol.Part):
    """The fraction of channels on which two spike maps agree, ``[S*N, 1, H, W]`` (an equality test: no
    gradient passes)."""

    def forward(self, q, k):
        return ((q == k) * 1.0).to(q.dtype).sum(dim=1, keepdim=True) / q.shape[1]

    def activity(self, inputs):
        return protocol.analog()


class Blend(protocol.Part):
    """``(1 - sim) * x + sim * y``."""

    def forward(self, x, y, sim):
        return (1 - sim) * x + sim * y

    def activity(self, inputs):
        return protocol.analog(inputs[0].sources | inputs[1].sources)


class PagFM(nn.Module):
    """Pixel-attention fusion of the detail map x with the context map y: the similarity of the spikes of their
    projections (f_x, f_y) weighs y (resized) against x."""

    def __init__(self, parts, channels, mid):
        super().__init__()
        self.f_x = conv_bn(channels, mid)
        self.f_y = conv_bn(channels, mid)
        self.resize_q, self.resize_y = Resize(), Resize()
        self.lif3, self.lif4 = parts.neuron(), parts.neuron()
        self.similarity = Similarity()
        self.blend = Blend()

    def forward(self, x, y):
        y_q = self.resize_q(self.f_y(y), x)
        sim = self.similarity(self.lif3(y_q), self.lif4(self.f_x(x)))
        return self.blend(x, self.resize_y(y, x), sim)


class BoundaryMix(protocol.Part):
    """Light_Bag's inputs to its two 1x1 convolutions, with e = sigmoid(d): ``(1 - e) * i + p`` (``to_p``)
    or ``i + e * p``."""

    def __init__(self, to_p: bool):
        super().__init__()
        self.to_p = to_p

    def forward(self, p, i, d):
        e = torch.sigmoid(d)
        return (1 - e) * i + p if self.to_p else i + e * p

    def activity(self, inputs):
        return protocol.analog()


class LightBag(nn.Module):
    """Boundary-guided fusion: ``conv_p((1 - e) * i + p) + conv_i(i + e * p)``, e = sigmoid(boundary)."""

    def __init__(self, channels):
        super().__init__()
        self.mix_p, self.mix_i = BoundaryMix(True), BoundaryMix(False)
        self.conv_p = conv_bn(channels, channels)
        self.conv_i = conv_bn(channels, channels)
        self.add = Add()

    def forward(self, p, i, d):
        return self.add(self.conv_p(self.mix_p(p, i, d)), self.conv_i(self.mix_i(p, i, d)))


@register_architecture("spike-brgnet")
class SpikeBRGNet(SegmentationNet):
    """The authors' network as their yamls build it (planes 32, pyramid 96, heads 128; m=2, n=3)."""

    heads = ("out", "aux", "boundary")
    ann_twin = False
    channels_last = False  # as sltnet (no faster either way on the CPU, a little less memory)
    config_defaults = {**PUBLISHED_NEURON, "timesteps": 5, "encoder": "sequence", "thl": True}
    unused_gradients = True  # pag*.f_x / f_y and seghead_d get none (DistributedDataParallel must know)

    def build(self, cfg, parts, planes=32, ppm=96, head=128):
        classes, channels, p = int(cfg["num_classes"]), int(cfg["in_channels"]), planes
        self.conv1 = nn.Sequential(
            Conv(channels, p, 3, 2, 1),
            BatchNorm(p),
            parts.neuron(),
            Conv(p, p, 3, 2, 1),
            BatchNorm(p),
            parts.neuron(),
        )
        self.layer1 = stage(parts, BasicBlock, p, p, 2)
        self.layer2 = stage(parts, BasicBlock, p, p * 2, 2, 2)
        self.layer3 = stage(parts, BasicBlock, p * 2, p * 4, 3, 2)
        self.layer4 = stage(parts, BasicBlock, p * 4, p * 8, 3, 2)
        self.layer5 = stage(parts, Bottleneck, p * 8, p * 8, 2, 2)
        self.compression3 = conv_bn(p * 4, p * 2)
        self.compression4 = conv_bn(p * 8, p * 2)
        self.pag3 = PagFM(parts, p * 2, p)
        self.pag4 = PagFM(parts, p * 2, p)
        self.layer3_ = stage(parts, BasicBlock, p * 2, p * 2, 2)
        self.layer4_ = stage(parts, BasicBlock, p * 2, p * 2, 2)
        self.layer5_ = Bottleneck(parts, p * 2, p * 2, fire=False)
        self.layer3_d = BasicBlock(parts, p * 2, p, fire=False)
        self.layer4_d = Bottleneck(parts, p, p, fire=False)
        self.diff3 = conv_bn(p * 4, p, 3, 1)
        self.diff4 = conv_bn(p * 8, p * 2, 3, 1)
        self.spp = PAPPM(parts, p * 16, ppm, p * 4)
        self.dfm = LightBag(p * 4)
        self.layer5_d = Bottleneck(parts, p * 2, p * 2, fire=False)
        self.seghead_p = SegmentHead(parts, p * 2, head, classes)
        self.seghead_d = SegmentHead(parts, p * 2, p, 1)
        self.final_layer = SegmentHead(parts, p * 4, head, classes)
        for i in range(1, 9):
            setattr(self, f"lif{i}", parts.neuron())
        self.resize3, self.resize4, self.resize_context = Resize(), Resize(), Resize()
        self.add3, self.add4 = Add(), Add()

    @classmethod
    def min_input_size(cls):
        return 8

    @classmethod
    def check_config(cls, cfg, **options):
        super().check_config(cfg, **options)
        if cfg.get("thl") is False or cfg.get("encoder") != "sequence":
            raise ValueError(
                "arch 'spike-brgnet' takes the event bins as timesteps of one input frame each (thl true, "
                f"timesteps = bins, encoder sequence); got thl {cfg.get('thl')}, encoder {cfg.get('encoder')}"
            )
        check_published_settings(cfg)

    def init_weights(self):
        """The authors': Kaiming normal (fan_out, relu) for every convolution weight; biases keep PyTorch's
        default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_steps(self, h):
        check_multiple_of_8(h, self.arch)
        x = self.layer1(self.conv1(h))
        x = self.lif2(self.layer2(self.lif1(x)))
        xp, xd = self.layer3_(x), self.layer3_d(x)
        x = self.lif3(self.layer3(x))
        xp = self.pag3(xp, self.compression3(x))
        xd = self.add3(xd, self.resize3(self.diff3(x), xd))
        detail = xp
        x = self.lif4(self.layer4(x))
        xp = self.layer4_(self.lif5(xp))
        xd = self.layer4_d(self.lif6(xd))
        xp = self.pag4(xp, self.compression4(x))
        xd = self.add4(xd, self.resize4(self.diff4(x), xd))
        boundary = xd
        xp = self.layer5_(self.lif7(xp))
        xd = self.layer5_d(self.lif8(xd))
        x = self.resize_context(self.spp(self.layer5(x)), xp)
        outputs = {"out": self.final_layer(self.dfm(xp, x, xd))}
        if self.training or not self.main_only:
            outputs["aux"] = self.seghead_p(detail)
            outputs["boundary"] = self.seghead_d(boundary)
        return outputs
