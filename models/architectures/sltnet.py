"""SLTNet (Zhu et al., "Efficient Event-based Semantic Segmentation with Spike-driven Lightweight Transformer-based
Networks", arXiv 2412.12843; github.com/xiaxinZhu/SLTNet at 0c2eb4af), equal to the authors' forward pass.

Input: the event voxel grid's bins as channels, one timestep (``[N, 5, H, W]``; H and W multiples of 8).
Outputs: ``out`` and ``aux`` (the authors' early head, which shares the classifier), both at the input's size.
The modules the authors build but never call (44,576 parameters) are left out; the state dict otherwise keeps
their names, so their checkpoints map one to one (utils/published_import.py). Each convolution, batch norm
and tensor operation is a part of its own (published_parts.py): energy counts every convolution on what it
receives. docs/models.md has the blocks, the numbers and what was checked.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import protocol
from ..network import SegmentationNet
from ..parts import Add
from . import register_architecture
from .published_parts import BatchNorm, Conv, Gate, GlobalAvgPool, Product, Resize, SharedConv

CONV_EPS, TRANSFORMER_EPS = 1e-3, 1e-5
PUBLISHED_NEURON = dict(
    neuron="lifact", leak_mem=0.25, def_threshold=0.5, reset="zero", surrogate="clamped_tanh", surrogate_params={}
)


class BNLIF(protocol.Part):
    """Batch norm (eps 1e-3) then the neurons: the authors' BNLIF."""

    def __init__(self, parts, channels):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=CONV_EPS)
        self.lif = parts.neuron()

    def forward(self, x):
        return self.lif(self.bn(x))

    def activity(self, inputs):
        return self.lif.emits()


class SpikeConv(protocol.Part):
    """A convolution without bias, with BN and neurons after it when ``spiking`` (the authors' Spike_Conv)."""

    def __init__(self, parts, c_in, c_out, kernel, stride=1, padding=0, dilation=1, groups=1, spiking=False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=False)
        self.bn_lif = BNLIF(parts, c_out) if spiking else None

    def forward(self, x):
        x = self.conv(x)
        return x if self.bn_lif is None else self.bn_lif(x)

    def activity(self, inputs):
        return protocol.analog() if self.bn_lif is None else self.bn_lif.activity(inputs)

    def synapses(self):
        return (protocol.Synapse(self.conv, local="conv"),)


class ChannelMean(protocol.Part):
    """ECA's global average, laid out ``[S*N, 1, 1, C]`` for its convolution across channels."""

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], 1, 1, x.shape[1])

    def activity(self, inputs):
        return protocol.analog(inputs[0].sources)


class ECA(protocol.Part):
    """Efficient channel attention: ``x * sigmoid(conv(mean))``, a 3-tap convolution across the channels of
    the mean (the authors' Conv1d, here a 1x3 Conv2d over ``[S*N, 1, 1, C]``: weight ``[1, 1, 1, 3]``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False)

    def forward(self, x, mean):
        return x * torch.sigmoid(self.conv(mean)).reshape(x.shape[0], x.shape[1], 1, 1)

    def activity(self, inputs):
        return protocol.analog(inputs[0].sources)

    def synapses(self):
        return (protocol.Synapse(self.conv, input=1, local="conv"),)


class LMSB(nn.Module):
    """Spike_LMSBModule: BN+LIF, 1x1 to C/2, a 3x1 and a 1x3 spiking convolution, two depthwise branches
    (plain and dilated) each with ECA, their sum with the trunk through BN+LIF, 1x1 back to C, plus the input."""

    def __init__(self, parts, c, d):
        super().__init__()
        h = c // 2
        self.bn_lif_1 = BNLIF(parts, c)
        self.conv1x1_in = SpikeConv(parts, c, h, 1)
        self.conv3x1 = SpikeConv(parts, h, h, (3, 1), padding=(1, 0), spiking=True)
        self.conv1x3 = SpikeConv(parts, h, h, (1, 3), padding=(0, 1), spiking=True)
        self.dconv3x1 = SpikeConv(parts, h, h, (3, 1), padding=(1, 0), groups=h, spiking=True)
        self.dconv1x3 = SpikeConv(parts, h, h, (1, 3), padding=(0, 1), groups=h, spiking=True)
        self.ca11_mean, self.ca11 = ChannelMean(), ECA()
        self.ddconv3x1 = SpikeConv(parts, h, h, (3, 1), padding=(d, 0), dilation=(d, 1), groups=h, spiking=True)
        self.ddconv1x3 = SpikeConv(parts, h, h, (1, 3), padding=(0, d), dilation=(1, d), groups=h, spiking=True)
        self.ca22_mean, self.ca22 = ChannelMean(), ECA()
        self.merge = Add()
        self.bn_lif_2 = BNLIF(parts, h)
        self.conv1x1 = SpikeConv(parts, h, c, 1)
        self.residual = Add()

    def forward(self, x):
        y = self.conv1x3(self.conv3x1(self.conv1x1_in(self.bn_lif_1(x))))
        a = self.dconv1x3(self.dconv3x1(y))
        a = self.ca11(a, self.ca11_mean(a))
        b = self.ddconv1x3(self.ddconv3x1(y))
        b = self.ca22(b, self.ca22_mean(b))
        return self.residual(self.conv1x1(self.bn_lif_2(self.merge(a, b, y))), x)


class Downsample(protocol.Part):
    """3x3 stride-2 convolution; when widening, beside the 2x2 max pooling of the input (DownSamplingBlock)."""

    def __init__(self, parts, c_in, c_out):
        super().__init__()
        self.widen = c_in < c_out
        self.conv3x3 = SpikeConv(parts, c_in, c_out - c_in if self.widen else c_out, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.conv3x3(x)
        return torch.cat([y, F.max_pool2d(x, 2, 2)], 1) if self.widen else y

    def activity(self, inputs):
        return protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self.conv3x3.conv, local="conv3x3.conv"),)


class Upsampling(protocol.Part):
    """Transposed 3x3 convolution, stride 2, with bias: exactly twice the size (UpsampleingBlock)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=True)

    def forward(self, x):
        return self.conv(x)

    def activity(self, inputs):
        return protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self.conv, in_dim=0, local="conv"),)


class PixelAttention(protocol.Part):
    """``x * sigmoid(conv1x1(x))`` with a bias (PA)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))

    def activity(self, inputs):
        return protocol.analog()

    def synapses(self):
        return (protocol.Synapse(self.conv, local="conv"),)


class LongConnection(nn.Module):
    """A 3x1 spiking convolution to half the channels, then a 1x3 one to ``c_out`` (LC)."""

    def __init__(self, parts, c_in, c_out):
        super().__init__()
        self.dconv3x1 = SpikeConv(parts, c_in, c_in // 2, (3, 1), padding=(1, 0), spiking=True)
        self.dconv1x3 = SpikeConv(parts, c_in // 2, c_out, (1, 3), padding=(0, 1), spiking=True)

    def forward(self, x):
        return self.dconv1x3(self.dconv3x1(x))


class ChannelStats(protocol.Part):
    """The mean and the maximum over the channels, two maps."""

    def forward(self, x):
        return torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True)[0]], 1)

    def activity(self, inputs):
        return protocol.analog(inputs[0].sources)


class FeatureEnhance(nn.Module):
    """A channel gate (global average, 1x1 spiking convolution to C/2, 1x1 back) and a spatial gate (3x3 on the
    channel mean and max, BN); one 1x1 convolution maps both gated maps, added to the input (FE)."""

    def __init__(self, parts, c):
        super().__init__()
        self.gap = GlobalAvgPool()
        self.conv1x1_1 = SpikeConv(parts, c, c // 2, 1, spiking=True)
        self.conv1x1_2 = SpikeConv(parts, c // 2, c, 1)
        self.channel_gate = Gate()
        self.stats = ChannelStats()
        self.conv3x3 = SpikeConv(parts, 2, 1, 3, padding=1)
        self.bn = BatchNorm(1, eps=CONV_EPS)
        self.spatial_gate = Gate()
        self.conv1x1 = SpikeConv(parts, c, c, 1)
        self.conv1x1_spatial = SharedConv(self.conv1x1.conv)  # the authors apply conv1x1 to both maps
        self.add = Add()

    def forward(self, x):
        channel = self.channel_gate(x, self.conv1x1_2(self.conv1x1_1(self.gap(x))))
        spatial = self.spatial_gate(x, self.bn(self.conv3x3(self.stats(x))))
        return self.add(x, self.conv1x1(channel), self.conv1x1_spatial(spatial))


class PadNorm(protocol.Part):
    """BN (eps 1e-5), then a one-pixel border holding what the BN maps zero to (BNAndPadLayer): its weight and
    bias detached, its running statistics as they are after this call."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, eps=TRANSFORMER_EPS)

    def forward(self, x):
        bn = self.bn
        out = F.pad(bn(x), [1, 1, 1, 1])
        fill = (bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).view(
            1, -1, 1, 1
        )
        out[:, :, 0:1, :] = fill
        out[:, :, -1:, :] = fill
        out[:, :, :, 0:1] = fill
        out[:, :, :, -1:] = fill
        return out

    def activity(self, inputs):
        return protocol.analog()


class RepConv(nn.Module):
    """1x1 convolution, PadNorm, depthwise 3x3 (no padding), 1x1 convolution, BN (eps 1e-5)."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(
            Conv(c, c, 1, bias=False),
            PadNorm(c),
            nn.Sequential(Conv(c, c, 3, groups=c, bias=False), Conv(c, c, 1, bias=False), BatchNorm(c)),
        )

    def forward(self, x):
        return self.body(x)


def projection(c):
    """RepConv then BN: the attention's q, k, v and output projections."""
    return nn.Sequential(RepConv(c), BatchNorm(c))


class KV(protocol.Part):
    """The spikes of the sum over pixels of ``k * v``, per channel (the talking-heads neurons)."""

    def __init__(self, parts):
        super().__init__()
        self.talking_heads_lif = parts.neuron()

    def forward(self, k, v):
        return self.talking_heads_lif((k * v).sum(dim=(2, 3), keepdim=True))

    def activity(self, inputs):
        return self.talking_heads_lif.emits()


class SpikeDrivenAttention(nn.Module):
    """SDSA1: ``proj(q * spike(sum_pixels k * v))`` with q, k, v the spikes of projections of the input's
    spikes; the heads do not mix channels, so this is per channel."""

    def __init__(self, parts, c):
        super().__init__()
        self.head_lif = parts.neuron()
        self.q_conv, self.k_conv, self.v_conv = projection(c), projection(c), projection(c)
        self.q_lif, self.k_lif, self.v_lif = parts.neuron(), parts.neuron(), parts.neuron()
        self.kv = KV(parts)
        self.attend = Product()
        self.proj_conv = projection(c)

    def forward(self, x):
        s = self.head_lif(x)
        q, k, v = self.q_lif(self.q_conv(s)), self.k_lif(self.k_conv(s)), self.v_lif(self.v_conv(s))
        return self.proj_conv(self.attend(q, self.kv(k, v)))


class SpikingMLP(nn.Module):
    """Neurons, 1x1 convolution to 4C (bias), BN, neurons, 1x1 back to C (bias), BN (MS_MLP; the authors'
    Conv1d and BatchNorm1d over the pixels, here their 2-D forms)."""

    def __init__(self, parts, c, ratio=4):
        super().__init__()
        self.fc1_lif = parts.neuron()
        self.fc1_conv = Conv(c, c * ratio, 1)
        self.fc1_bn = BatchNorm(c * ratio)
        self.fc2_lif = parts.neuron()
        self.fc2_conv = Conv(c * ratio, c, 1)
        self.fc2_bn = BatchNorm(c)

    def forward(self, x):
        return self.fc2_bn(self.fc2_conv(self.fc2_lif(self.fc1_bn(self.fc1_conv(self.fc1_lif(x))))))


class TransformerBlock(nn.Module):
    """MS_Block as called: ``x + attention(x)``, then ``x + mlp(x)`` (its attn2 and attn3 are never called)."""

    def __init__(self, parts, c):
        super().__init__()
        self.attn1 = SpikeDrivenAttention(parts, c)
        self.attn_add = Add()
        self.mlp = SpikingMLP(parts, c)
        self.mlp_add = Add()

    def forward(self, x):
        x = self.attn_add(x, self.attn1(x))
        return self.mlp_add(x, self.mlp(x))


@register_architecture("sltnet")
class SLTNet(SegmentationNet):
    """The authors' SLTNet with its default depths (3, 3, 3, 1, 1, 1 LMSB modules)."""

    heads = ("out", "aux")
    ann_twin = False
    channels_last = False  # measured faster on the CPU for its mix of depthwise and batch-norm layers
    config_defaults = {**PUBLISHED_NEURON, "timesteps": 1, "encoder": "direct", "thl": False}

    def build(self, cfg, parts):
        classes, channels = int(cfg["num_classes"]), int(cfg["in_channels"])
        self.init_conv = nn.Sequential(
            SpikeConv(parts, channels, 32, 3, padding=1, spiking=True),
            SpikeConv(parts, 32, 32, 3, padding=1, spiking=True),
            SpikeConv(parts, 32, 32, 3, stride=2, padding=1),
        )
        self.bn_lif_1 = BNLIF(parts, 32)
        self.downsample_1 = Downsample(parts, 32, 64)
        self.DAB_Block_1 = self._stage(parts, 1, 64, (2, 2, 2))
        self.bn_lif_2 = BNLIF(parts, 64)
        self.downsample_2 = Downsample(parts, 64, 128)
        self.DAB_Block_2 = self._stage(parts, 2, 128, (1, 1, 2))
        self.bn_lif_3 = BNLIF(parts, 128)
        self.downsample_3 = Downsample(parts, 128, 32)
        self.DAB_Block_3 = self._stage(parts, 3, 32, (1, 1, 2))
        self.bn_lif_4 = BNLIF(parts, 32)
        self.transformer1 = TransformerBlock(parts, 32)
        self.transformer2 = TransformerBlock(parts, 32)
        self.DAB_Block_4 = self._stage(parts, 4, 32, (2,))
        self.upsample_1 = Upsampling(32, 16)
        self.bn_lif_5 = BNLIF(parts, 16)
        self.DAB_Block_5 = self._stage(parts, 5, 16, (2,))
        self.upsample_2 = Upsampling(16, 16)
        self.bn_lif_6 = BNLIF(parts, 16)
        self.DAB_Block_6 = self._stage(parts, 6, 16, (2,))
        self.upsample_3 = Upsampling(16, 16)
        self.bn_lif_7 = BNLIF(parts, 16)
        self.PA3 = PixelAttention(16)
        self.LC1 = LongConnection(parts, 64, 16)
        self.LC2 = LongConnection(parts, 128, 16)
        self.LC3 = LongConnection(parts, 32, 32)
        self.FE1 = FeatureEnhance(parts, 16)
        self.FE2 = FeatureEnhance(parts, 16)
        self.FE3 = FeatureEnhance(parts, 32)
        self.classifier = nn.Sequential(SpikeConv(parts, 16, classes, 1))
        self.classifier_early = SharedConv(self.classifier[0].conv)  # one classifier, two heads
        self.skip_3, self.skip_2, self.skip_1 = Add(), Add(), Add()
        self.resize_5, self.resize_early, self.resize_out = Resize(), Resize(), Resize()

    @staticmethod
    def _stage(parts, index, channels, dilations):
        stage = nn.Sequential()
        for i, d in enumerate(dilations):
            stage.add_module(f"DAB_Module_{index}_{i}", LMSB(parts, channels, d))
        return stage

    @classmethod
    def min_input_size(cls):
        return 8

    @classmethod
    def check_config(cls, cfg, **options):
        super().check_config(cfg, **options)
        if cfg.get("thl") or cfg.get("encoder") == "sequence":
            raise ValueError(
                "arch 'sltnet' takes the event bins as input channels at one timestep; thl (bins as timesteps) "
                "is spike-brgnet's layout: use --thl false"
            )
        check_published_settings(cfg)

    def init_weights(self):
        """The authors': truncated normal (std 0.02, cut at +-2) for their 2-D convolutions, biases zero; ECA's
        and the MLP's (their Conv1d) and the transposed convolutions keep PyTorch's default."""
        one_d = {id(m.conv) for m in self.modules() if isinstance(m, ECA)}
        one_d |= {id(m.fc1_conv) for m in self.modules() if isinstance(m, SpikingMLP)}
        one_d |= {id(m.fc2_conv) for m in self.modules() if isinstance(m, SpikingMLP)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in one_d:
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_steps(self, h):
        check_multiple_of_8(h, self.arch)
        s0 = self.bn_lif_1(self.init_conv(h))
        s1 = self.bn_lif_2(self.DAB_Block_1(self.downsample_1(s0)))
        s2 = self.bn_lif_3(self.DAB_Block_2(self.downsample_2(s1)))
        s3 = self.bn_lif_4(self.DAB_Block_3(self.downsample_3(s2)))
        y = self.DAB_Block_4(self.transformer2(self.transformer1(s3)))
        y = self.bn_lif_5(self.upsample_1(self.skip_3(y, self.FE3(self.LC3(s3)))))
        y = self.DAB_Block_5(y)
        skip = self.FE2(self.LC2(s2))
        y5 = self.bn_lif_6(self.upsample_2(self.skip_2(self.resize_5(y, skip), skip)))
        outputs = {}
        if self.training or not self.main_only:
            outputs["aux"] = self.classifier_early(self.resize_early(y5, h))
        y = self.DAB_Block_6(y5)
        y = self.PA3(self.upsample_3(self.skip_1(y, self.FE1(self.LC1(s1)))))
        outputs["out"] = self.classifier(self.bn_lif_7(self.resize_out(y, h)))
        return outputs


def check_published_settings(cfg):
    """What both published networks need: their batch norm over all timesteps at once, the image sides
    multiples of 8 (their down- and upsampling must agree)."""
    if cfg.get("bn") is False:
        raise ValueError(f"arch {cfg['arch']!r}: its batch norms are part of the published network; use --bn true")
    if cfg.get("memory_saving"):
        raise ValueError(
            f"arch {cfg['arch']!r} takes batch-norm statistics over all timesteps at once, which memory-saving "
            "mode's blocks of timesteps would change; use --memory_saving false"
        )
    size = cfg.get("img_size")
    if isinstance(size, (list, tuple)) and any(int(s) % 8 for s in size):
        raise ValueError(
            f"arch {cfg['arch']!r} needs image sides that are multiples of 8, got img_size {' '.join(map(str, size))}"
        )


def check_multiple_of_8(h, arch):
    if h.shape[-1] % 8 or h.shape[-2] % 8:
        raise ValueError(f"arch {arch!r} needs image sides that are multiples of 8, got {h.shape[-2]}x{h.shape[-1]}")
