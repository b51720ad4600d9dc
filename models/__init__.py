"""Models: spiking neurons (LIF, IF, PLIF; models/neurons.py), surrogate gradients, input encoders and the
ANN/SNN segmentation networks.

Everything is built from a plain config dict by ``build_model(cfg)``; keys not given take
``MODEL_DEFAULTS`` (the paper code's defaults).
"""

import math

from utils import config as config_schema

from .architectures import ARCHITECTURES, is_fcn
from .encoders import ENCODERS
from .network import SegmentationNet
from .neurons import IF, LIF, NEURONS, PLIF, RESETS, Neuron, build_neuron, lif_sequence, register_neuron
from .surrogates import SURROGATES, get_surrogate

# The model section of the configuration schema (utils/config.py), where each key's default, type,
# choices and range are declared once. 'conv_bias' is set for SNNs converted from ANNs (folded BN bias);
# 'readout' 'sum' reproduces the paper code's FCN readout, which is not divided by T.
MODEL_DEFAULTS = config_schema.defaults("model")


def resolve_model_config(cfg: dict) -> dict:
    """``cfg`` completed with the defaults, coerced and checked against the configuration schema.

    Keys of other sections (data, training) pass through; keys that no section declares are refused.
    """
    config_schema.check_known(cfg, "model config")
    given = {k: v for k, v in cfg.items() if v is not None or config_schema.SCHEMA[k].optional}
    cfg = {**MODEL_DEFAULTS, **given}
    for key in MODEL_DEFAULTS:
        try:
            cfg[key] = config_schema.coerce(key, cfg[key])
        except ValueError as err:
            raise ValueError(f"model config {key!r}: {err}") from None
    config_schema.check_values(cfg, section="model")
    _check_surrogate(cfg["surrogate"], cfg["surrogate_params"])
    if cfg["model_type"] == "snn":
        _check_neuron(cfg)
    if cfg["full_prop"] and cfg["model_type"] != "snn":
        raise ValueError("'full_prop' applies to SNNs only (model_type 'snn')")
    return cfg


def _check_neuron(cfg):
    """The neuron model can be built with these settings (e.g. plif's leak_mem), on this backend."""
    try:
        build_neuron(
            cfg["neuron"],
            leak=cfg["leak_mem"],
            threshold=cfg["def_threshold"],
            surrogate=cfg["surrogate"],
            surrogate_params=cfg["surrogate_params"],
            alpha=float(cfg["alpha"]) if cfg["leaky"] else None,
            reset=cfg["reset"],
            backend=cfg["neuron_backend"],
        )
    except ValueError as err:
        raise ValueError(f"model config neuron {cfg['neuron']!r}: {err}") from None


def _check_surrogate(name, params):
    """Surrogate parameters are finite numbers the surrogate knows; errors name surrogate_params."""
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"surrogate_params {key!r} must be a finite number, got {value!r}")
    try:
        get_surrogate(name, **params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"surrogate_params {params}: {err}") from None


def build_model(cfg: dict) -> SegmentationNet:
    """The ANN or SNN described by ``cfg`` (see ``MODEL_DEFAULTS``), freshly initialised."""
    cfg = resolve_model_config(cfg)  # unknown keys, choices, ranges and surrogate parameters: errors first
    model = SegmentationNet(cfg)
    if cfg["pretrained"]:
        model.load_vgg_weights(cfg["pretrained"])
    return model


__all__ = [
    "ARCHITECTURES",
    "ENCODERS",
    "SURROGATES",
    "MODEL_DEFAULTS",
    "LIF",
    "IF",
    "PLIF",
    "Neuron",
    "NEURONS",
    "RESETS",
    "register_neuron",
    "SegmentationNet",
    "build_model",
    "resolve_model_config",
    "lif_sequence",
    "get_surrogate",
    "is_fcn",
]
