"""The model's configuration keys and their resolution: the model section of the run's schema.

Each key's default, type, choices and range is declared once here; ``utils/config.py`` turns them into
flags and YAML keys, and ``resolve_model_config`` completes and checks a config for ``build_model``.
The defaults are the paper code's. 'conv_bias' is set for SNNs converted from ANNs (folded BN bias);
'readout' 'sum' reproduces the paper code's FCN readout, which is not divided by T.
"""

import difflib
import math

from common.keys import ABOVE_ZERO, POSITIVE, Interval, Key, check_value, coerce, key_table

from .architectures import ARCHITECTURES, get_architecture
from .convolution import DENSE_CHOICES
from .encoders import ENCODERS
from .neurons import BACKENDS, NEURONS, RESETS, build_neuron, neuron_arguments, supports
from .surrogates import SURROGATES, get_surrogate


def _names(registry):
    return lambda: sorted(registry)


_M = "model"
MODEL_KEYS = key_table(
    [
        Key("model_type", _M, "snn", str, "snn (spiking) or ann (its analog twin)", ("snn", "ann")),
        Key("arch", _M, "dl-vgg9", str, "architecture", _names(ARCHITECTURES)),
        Key("in_channels", _M, 3, int, "input channels (from the dataset)", interval=POSITIVE, derived=True),
        Key("num_classes", _M, 21, int, "classes (from the dataset)", interval=POSITIVE, derived=True),
        Key("img_size", _M, [64, 64], "size", "input size: one int (square), H W, or -1 for the native size"),
        Key("timesteps", _M, 20, int, "number of SNN timesteps T", interval=POSITIVE, snn_only=True),
        Key(
            "leak_mem",
            _M,
            0.99,
            float,
            "membrane leak per timestep (1 = no leak)",
            interval=Interval(0, 1, low_open=True),
            snn_only=True,
        ),
        Key(
            "neuron",
            _M,
            "lif",
            str,
            "spiking neuron model, any registered one (their equations, sources and the keys each ignores: "
            "docs/neurons.md)",
            _names(NEURONS),
            snn_only=True,
        ),
        Key(
            "reset",
            _M,
            "subtract",
            str,
            "membrane reset after a spike: subtract (the threshold) or zero",
            RESETS,
            snn_only=True,
        ),
        Key("def_threshold", _M, 1.0, float, "firing threshold", interval=ABOVE_ZERO, snn_only=True),
        Key(
            "detach_reset",
            _M,
            True,
            bool,
            "the reset sees the spike without its gradient (false: the gradient also flows through the reset, "
            "as the published clif, glif and ilif train)",
            snn_only=True,
        ),
        Key(
            "spike_levels",
            _M,
            4,
            int,
            "largest spike level D of multi-level neurons (ilif: integer spikes 0..D)",
            interval=Interval(1, 127),
            snn_only=True,
        ),
        Key("surrogate", _M, "linear", str, "surrogate gradient of the spike", _names(SURROGATES), snn_only=True),
        Key("surrogate_params", _M, {}, "mapping", "surrogate parameters, e.g. '{gamma: 0.3}'", snn_only=True),
        Key("bn", _M, True, bool, "batch norm through time (one statistic per timestep)"),
        Key(
            "bntt",
            _M,
            True,
            bool,
            "SNN BN: one per timestep (BNTT); false: one BN over all timesteps, folded into the conv at export",
            snn_only=True,
        ),
        Key(
            "encoder",
            _M,
            "poisson",
            str,
            "input coding: poisson (rate), direct (analog) or sequence (thl)",
            _names(ENCODERS),
            snn_only=True,
        ),
        Key(
            "full_prop",
            _M,
            False,
            bool,
            "SNN: extra zero-input steps so that the last input reaches the output",
            snn_only=True,
        ),
        Key("leaky", _M, False, bool, "leaky ReLU (slope alpha) instead of ReLU"),
        Key("alpha", _M, 0.1, float, "leaky ReLU slope", interval=ABOVE_ZERO),
        Key("pretrained", _M, None, str, "local torchvision VGG weights (.pth) for the backbone", optional=True),
        Key(
            "memory_saving",
            _M,
            False,
            bool,
            "replay blocks of memory_block timesteps in backward, recomputing each spiking conv",
            execution=True,
        ),
        Key(
            "memory_block",
            _M,
            4,
            int,
            "timesteps per replayed block (memory_saving)",
            interval=POSITIVE,
            execution=True,
        ),
        Key(
            "compile",
            _M,
            False,
            bool,
            "torch neuron backend: fuse its per-timestep elementwise steps with torch.compile (this model only)",
            execution=True,
        ),
        Key("conv_bias", _M, False, bool, "conv biases (SNNs converted from ANNs carry the folded BN there)"),
        Key(
            "readout",
            _M,
            "mean",
            str,
            "output over T: mean, or sum (the paper code's FCN SNN)",
            ("mean", "sum"),
            snn_only=True,
        ),
        Key(
            "neuron_backend",
            _M,
            "auto",
            str,
            "execution backend of the neurons: auto (the fastest that supports the neuron: Triton kernels on "
            "CUDA when Triton imports, else the torch loops, else generic), generic, torch, or triton",
            BACKENDS,
            execution=True,
        ),
        Key(
            "dilated_as_dense",
            _M,
            "auto",
            str,
            "dilated convolutions as dense ones over the dilation's phases (space-to-batch): "
            "auto (CUDA in bf16/fp16), on or off",
            DENSE_CHOICES,
            execution=True,
        ),
    ]
)
MODEL_DEFAULTS = {name: key.default_value() for name, key in MODEL_KEYS.items()}


def resolve_model_config(cfg: dict, other_keys=()) -> dict:
    """``cfg`` completed with the defaults, coerced and checked.

    Keys of ``other_keys`` (those of the run's other sections, which the configuration layer passes) go
    through untouched; any other key that is not a model key is refused, with the closest model key as a
    hint, so that a misspelt key never falls back silently to its default.
    """
    _check_known(cfg, other_keys)
    given = {k: v for k, v in cfg.items() if v is not None or k not in MODEL_KEYS or MODEL_KEYS[k].optional}
    cfg = {**MODEL_DEFAULTS, **architecture_defaults(given.get("arch", MODEL_DEFAULTS["arch"])), **given}
    for name, key in MODEL_KEYS.items():
        try:
            cfg[name] = coerce(key, cfg[name])
            check_value(key, cfg[name])
        except ValueError as err:
            raise ValueError(f"model config {name!r}: {err}") from None
    _check_surrogate(cfg["surrogate"], cfg["surrogate_params"])
    if cfg["model_type"] == "snn":
        _check_neuron(cfg)
    if cfg["full_prop"] and cfg["model_type"] != "snn":
        raise ValueError("'full_prop' applies to SNNs only (model_type 'snn')")
    arch, options = get_architecture(cfg["arch"])
    arch.check_config(cfg, **options)
    return cfg


def architecture_defaults(arch: str, keys=None) -> dict:
    """The settings architecture ``arch`` is defined with (its ``config_defaults``), the model keys among
    them unless ``keys`` names others: they apply where a config does not give the key."""
    if arch not in ARCHITECTURES:
        return {}  # an unknown name is refused with the choices when the key is checked
    defaults = ARCHITECTURES[arch][0].config_defaults
    keys = MODEL_KEYS if keys is None else keys
    return {k: v for k, v in defaults.items() if k in keys}


def model_keys_of(cfg: dict) -> dict:
    """The model keys of a run config."""
    return {k: v for k, v in cfg.items() if k in MODEL_KEYS}


def _check_known(cfg, other_keys):
    unknown = [k for k in cfg if k not in MODEL_KEYS and k not in other_keys]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(str(name), [*MODEL_KEYS, *other_keys], n=1, cutoff=0.7)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"model config: unknown config key(s): {', '.join(hints)}")


def _check_neuron(cfg):
    """The neuron model can be built with these settings (e.g. plif's leak_mem), on this backend."""
    try:
        build_neuron(cfg["neuron"], **neuron_arguments(cfg))
    except ValueError as err:
        raise ValueError(f"model config neuron {cfg['neuron']!r}: {err}") from None


def compile_problem(cfg) -> str | None:
    """Why 'compile' (the torch backend's per-timestep compile) cannot apply to the neurons of run config
    ``cfg``: they run on the generic path. None if it applies, or if the neuron cannot be built at all (the
    model's own check says why). A run refuses it (utils/config.py); a stored model with it still loads."""
    if not cfg.get("compile") or cfg.get("model_type", "snn") != "snn":
        return None
    try:
        neuron = build_neuron(cfg["neuron"], **neuron_arguments(cfg))
    except (ValueError, KeyError):
        return None
    if cfg["neuron_backend"] != "generic" and supports("torch", neuron):
        return None
    path = "neuron_backend 'generic'" if cfg["neuron_backend"] == "generic" else f"neuron '{cfg['neuron']}'"
    return (
        f"compile applies to the torch neuron backend's steps, but {path} runs on the generic path; "
        "leave compile out (torch.compile of the whole model: benchmarks/bench.py --compile_model)"
    )


def _check_surrogate(name, params):
    """Surrogate parameters are finite numbers the surrogate knows; errors name surrogate_params."""
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"surrogate_params {key!r} must be a finite number, got {value!r}")
    try:
        get_surrogate(name, **params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"surrogate_params {params}: {err}") from None
