"""Models: LIF neurons, surrogate gradients, input encoders and the ANN/SNN segmentation networks.

Everything is built from a plain config dict by ``build_model(cfg)``; keys not given take
``MODEL_DEFAULTS`` (the paper code's defaults).
"""
from .architectures import ARCHITECTURES, is_fcn
from .encoders import ENCODERS
from .network import SegmentationNet
from .neurons import LIF, compile_neuron_kernels, lif_sequence
from .surrogates import SURROGATES, get_surrogate

MODEL_TYPES = ('ann', 'snn')
READOUTS = ('mean', 'sum')

MODEL_DEFAULTS = {
    'model_type': 'snn',
    'arch': 'dl-vgg9',
    'in_channels': 3,
    'num_classes': 21,
    'img_size': [64, 64],
    'timesteps': 20,
    'leak_mem': 0.99,
    'def_threshold': 1.0,
    'surrogate': 'linear',
    'surrogate_params': {},
    'bn': True,
    'encoder': 'poisson',
    'full_prop': False,
    'leaky': False,
    'alpha': 0.1,
    'pretrained': None,
    'memory_saving': False,
    'memory_block': 4,
    'compile': False,
    # Not flags of the paper's code: 'conv_bias' is set for SNNs converted from ANNs (folded BN
    # bias); 'readout' 'sum' reproduces the paper code's FCN readout, which is not divided by T.
    'conv_bias': False,
    'readout': 'mean',
}


def resolve_model_config(cfg: dict) -> dict:
    """``cfg`` completed with the defaults and checked; other (non-model) keys pass through."""
    cfg = {**MODEL_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == 'pretrained'}}
    _check_choice('model_type', cfg['model_type'], MODEL_TYPES)
    _check_choice('arch', cfg['arch'], sorted(ARCHITECTURES))
    _check_choice('surrogate', cfg['surrogate'], sorted(SURROGATES))
    _check_choice('encoder', cfg['encoder'], sorted(ENCODERS))
    _check_choice('readout', cfg['readout'], READOUTS)
    for key in ('in_channels', 'num_classes', 'timesteps', 'memory_block'):
        if int(cfg[key]) < 1:
            raise ValueError(f"model config '{key}' must be a positive integer, got {cfg[key]!r}")
    if float(cfg['def_threshold']) <= 0:
        raise ValueError(f"model config 'def_threshold' must be > 0, got {cfg['def_threshold']!r}")
    if cfg['leaky'] and float(cfg['alpha']) <= 0:
        raise ValueError(f"model config 'alpha' (leaky ReLU slope) must be > 0, got {cfg['alpha']!r}")
    if cfg['full_prop'] and cfg['model_type'] != 'snn':
        raise ValueError("'full_prop' applies to SNNs only (model_type 'snn')")
    return cfg


def build_model(cfg: dict) -> SegmentationNet:
    """The ANN or SNN described by ``cfg`` (see ``MODEL_DEFAULTS``), freshly initialised."""
    cfg = resolve_model_config(cfg)
    get_surrogate(cfg['surrogate'], **(cfg['surrogate_params'] or {}))  # fail early on bad parameters
    if cfg['compile']:
        compile_neuron_kernels(True)
    model = SegmentationNet(cfg)
    if cfg['pretrained']:
        model.load_vgg_weights(cfg['pretrained'])
    return model


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {key} '{value}'; choose one of {list(choices)}")


__all__ = ['ARCHITECTURES', 'ENCODERS', 'SURROGATES', 'MODEL_DEFAULTS', 'LIF', 'SegmentationNet',
           'build_model', 'resolve_model_config', 'lif_sequence', 'get_surrogate', 'is_fcn']
