"""Models: spiking neurons (models/neurons/), surrogate gradients, input encoders, the parts networks are
built from (models/parts.py) and the architectures (models/architectures/, one file each).

Everything is built from a plain config dict by ``build_model(cfg)``; keys not given take
``MODEL_DEFAULTS`` (the paper code's defaults, declared in ``models/config.py``).
"""

from .architectures import ARCHITECTURES, build_architecture, get_architecture, register_architecture
from .config import MODEL_DEFAULTS, MODEL_KEYS, model_keys_of, resolve_model_config
from .encoders import ENCODERS
from .network import SegmentationNet
from .neurons import IF, LIF, NEURONS, PLIF, RESETS, Neuron, build_neuron, lif_sequence, register_neuron
from .surrogates import SURROGATES, get_surrogate


def build_model(cfg: dict, other_keys=()) -> SegmentationNet:
    """The ANN or SNN described by ``cfg`` (see ``MODEL_DEFAULTS``), freshly initialised.

    ``other_keys``: the names of the run's other settings that ``cfg`` may also hold (kept in
    ``model.config``); any other key that is not a model key is refused.
    """
    cfg = resolve_model_config(cfg, other_keys)  # unknown keys, choices, ranges, neuron: errors first
    model = build_architecture(cfg)
    if cfg["pretrained"]:
        model.pretrained_layers = model.load_pretrained(cfg["pretrained"])  # (copied, kept at initialisation)
    return model


__all__ = [
    "ARCHITECTURES",
    "ENCODERS",
    "SURROGATES",
    "MODEL_DEFAULTS",
    "MODEL_KEYS",
    "LIF",
    "IF",
    "PLIF",
    "Neuron",
    "NEURONS",
    "RESETS",
    "register_neuron",
    "register_architecture",
    "get_architecture",
    "build_neuron",
    "SegmentationNet",
    "build_model",
    "resolve_model_config",
    "model_keys_of",
    "lif_sequence",
    "get_surrogate",
]
