"""Export a spiking DeepLab to NIR, the Neuromorphic Intermediate Representation (docs/deployment.md).

    python converter.py export-nir trained_models/quickstart-deployable/best.pth -o quickstart.nir

The graph holds the network up to and including the readout. Each layer says what it is in NIR's terms
(models/protocol.py: ``nir_layers``): a conv unit is a ``Conv2d`` (eval-mode batch norm folded into its weight
and bias) followed by a ``LIF`` (leak < 1) or ``IF`` (leak 1) node, an average pooling an ``AvgPool2d``, the
1x1 output convolution a ``Conv2d``, a residual ADD no node at all (NIR sums the edges that meet at a node);
the layer graph (models/graph.py) gives the edges, and the readout is an integrator ``I``.
What stays on the host (the input encoding, the division of the readout by T, the final bilinear
upsampling) is written into the graph's metadata, key ``snnseg``, as a JSON string.

Discretisation. NIR's neurons are continuous-time; ours are discrete. The graph is written for forward
Euler with step ``dt`` (``--dt``, default 1e-4, the step snnTorch's importer assumes; written in the
metadata), under which NIR's equations become, with v_leak = 0:

    LIF  tau dv/dt = -v + r I     ->  v[t] = (1 - dt/tau) v[t-1] + (dt/tau) r I[t]
    IF       dv/dt = r I          ->  v[t] = v[t-1] + dt r I[t]
    I        dv/dt = r I          ->  v[t] = v[t-1] + dt r I[t]

so our ``u[t] = leak u[t-1] + I[t]`` is LIF with tau = dt / (1 - leak) and r = tau / dt (the input
current taken as it is), IF with r = 1 / dt for leak 1, and the readout is I with r = 1 / dt. A neuron
fires when v > v_threshold (ours: u / theta > 1) and is set to v_reset = 0: only the hard reset (model key
``reset: zero``) is NIR's reset. ``unit_r=True`` writes r = 1 instead and multiplies the weights and bias of
the convolution in front of each LIF by tau / dt (Norse's reading, which ignores r).

Not expressible, so refused with one line naming the layer and the option that makes it exportable
(``lossy=True`` exports anyway and lists what changes): BNTT (per-timestep batch norm), reset by
subtraction, the negative threshold of leaky-ReLU conversions, Poisson input encoding (random; the host
would have to draw the spikes). Refused always: a layer with no NIR form (the FCN decoder, which upsamples
between spiking stages; max pooling; a neuron model with no NIR node).
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_path, check_replace
from models.graph import INPUT, layer_graph
from models.protocol import NirAvgPool, NirConv, NirNeuron, NotSupported
from utils import preflight
from utils.checkpoint import load_model
from utils.config import check_img_size, parse_size

FORMAT = "snnseg-nir-1"
METADATA_KEY = "snnseg"
DEFAULT_DT = 1e-4
HOST_ENCODINGS = {
    "direct": "the (normalised) image is fed as the input current at every one of the T steps",
    "sequence": "frame t of the [T, C, H, W] event sequence is the input current of step t",
    "poisson": "signed Poisson rate coding: at every step s = sign(x) * [rand <= |x|] (random)",
}


def require_nir():
    try:
        import nir
    except ImportError:
        raise MissingPackage("NIR export needs the 'nir' package: pip install nir") from None
    return nir


class MissingPackage(ValueError):
    """An optional package is not installed (a ValueError, so that the scripts print it as one line)."""


class NotExportable(ValueError):
    """A model that NIR cannot express exactly; the message names the layer and the fix."""


# --------------------------------------------------------------------------------- what cannot go
def export_problems(model, input_size=(64, 64)) -> list:
    """(layer, what is not expressible, what would make it exportable, what --lossy does) for each problem,
    in the order the signal meets them; every layer is asked (models/protocol.py: nir_layers, nir_problems).
    Empty: the model exports exactly."""
    if not model.spiking:
        return [("model", "an ANN has no spiking dynamics", "convert it first (test.py --conversion --save_snn)", None)]
    problems = []
    if model.config.get("encoder") == "poisson":
        problems.append(
            (
                "input",
                "Poisson encoding is random and stays on the host",
                "encoder: direct",
                "the graph's input is the host's Poisson spikes (metadata input.encoding: poisson)",
            )
        )
    graph = layer_graph(model, input_size)
    try:
        graph.check("NIR export")
    except NotSupported as err:
        return [
            (
                str(err).split(":")[0].removeprefix("layer "),
                str(err).split(": ", 1)[1],
                "parts the graph can follow",
                None,
            )
        ]
    for node in graph.nodes:
        try:
            node.part.nir_layers()
        except NotSupported as err:
            problems.append((node.name, err.what, err.fix or "another architecture", None))
            continue
        problems += [(node.name, p.what, p.fix, p.lossy) for p in node.part.nir_problems()]
    return problems


def _refusal(problem) -> str:
    layer, what, fix, lossy = problem
    tail = "; --lossy exports it anyway" if lossy else " (not exportable even with --lossy)"
    return f"layer {layer}: {what}: make it exportable with {fix}{tail}"


# ------------------------------------------------------------------------------------------ graph
def _conv_out(size, kernel, stride, padding, dilation):
    return tuple((s + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i, s in enumerate(size))


def _per_neuron(value, shape, layer=""):
    """A float or a tensor broadcasting against [C, H, W] -> float32 array of shape [C, H, W]."""
    array = torch.as_tensor(value).detach().cpu().double().numpy()
    try:
        return np.ascontiguousarray(np.broadcast_to(array, shape)).astype(np.float32)
    except ValueError:
        raise NotExportable(
            f"layer {layer}: its thresholds of shape {tuple(array.shape)} do not fit its neurons {tuple(shape)} "
            "at this input size (neuron-wise thresholds hold for the size they were calibrated at)"
        ) from None


def _f32(tensor):
    return np.ascontiguousarray(torch.as_tensor(tensor).detach().cpu().numpy().astype(np.float32))


def _with_unit_r(chain, dt):
    """Norse's convention r = 1: the factor tau / dt of each LIF goes into the convolution in front of it."""
    chain = list(chain)
    for i, layer in enumerate(chain):
        leak = torch.as_tensor(getattr(layer, "leak", 1.0), dtype=torch.float64)
        if isinstance(layer, NirNeuron) and bool((leak < 1).any()) and i and isinstance(chain[i - 1], NirConv):
            factor = ((dt / (1 - leak)) / dt).reshape(-1)  # one value, or one per channel
            conv = chain[i - 1]
            chain[i - 1] = replace(conv, weight=conv.weight * factor.view(-1, 1, 1, 1), bias=conv.bias * factor)
    return chain


def _nir_node(nir, layer, shape, dt, unit_r, name):
    """(NIR node, output shape [C, H, W]) of one primitive for inputs of ``shape``."""
    if isinstance(layer, NirConv):
        weight = layer.weight
        out = (
            int(weight.shape[0]),
            *_conv_out(shape[1:], tuple(weight.shape[-2:]), layer.stride, layer.padding, layer.dilation),
        )
        node = nir.Conv2d(
            input_shape=tuple(int(s) for s in shape[1:]),
            weight=_f32(weight),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=_f32(layer.bias),
        )
        return node, out
    if isinstance(layer, NirAvgPool):
        out = (shape[0], *_conv_out(shape[1:], layer.kernel, layer.stride, layer.padding, (1, 1)))
        node = nir.AvgPool2d(
            kernel_size=np.array(layer.kernel), stride=np.array(layer.stride), padding=np.array(layer.padding)
        )
        return node, out
    leak = torch.as_tensor(layer.leak, dtype=torch.float64)
    if bool((leak < 1).any()):
        tau = dt / (1 - leak)
        r = torch.ones_like(tau) if unit_r else tau / dt
        node = nir.LIF(
            tau=_per_neuron(tau, shape),
            r=_per_neuron(r, shape),
            v_leak=np.zeros(shape, np.float32),
            v_threshold=_per_neuron(layer.threshold, shape, name),
            v_reset=np.zeros(shape, np.float32),
        )
    else:
        node = nir.IF(
            r=_per_neuron(1.0 / dt, shape),
            v_threshold=_per_neuron(layer.threshold, shape, name),
            v_reset=np.zeros(shape, np.float32),
        )
    return node, tuple(shape)


def build_graph(model, input_size, dt: float = DEFAULT_DT, unit_r: bool = False):
    """The NIR graph of ``model`` (eval mode) for inputs of ``input_size`` (H, W), and the node names of
    its neuron layers (in the order the signal reaches them). Does not check ``export_problems``: each
    layer gives its chain of primitives (models/protocol.py), the layer graph gives the edges, and where
    several edges meet at a node NIR sums them (a residual ADD)."""
    nir = require_nir()
    if dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    channels, size = int(model.config["in_channels"]), tuple(int(s) for s in input_size)
    graph = layer_graph(model, size)
    nodes, edges, neurons = {"input": nir.Input(input_type=np.array([channels, *size]))}, [], []
    exits, shapes = {INPUT: ["input"]}, {INPUT: (channels, *size)}
    for node in graph.nodes:
        try:
            chain = node.part.nir_layers()
        except NotSupported as err:
            raise NotExportable(f"layer {node.name}: {err.what}") from None
        sources = [name for producer in node.inputs for name in exits[producer]]
        shape = shapes[node.inputs[0]]
        for layer in _with_unit_r(chain, dt) if unit_r else chain:
            name = f"{node.name}.{layer.role}"
            nodes[name], shape = _nir_node(nir, layer, shape, dt, unit_r, node.name)
            edges += [(source, name) for source in sources]
            sources = [name]
            if isinstance(layer, NirNeuron):
                neurons.append(name)
        exits[node], shapes[node] = sources, shape
    last = graph.outputs["out"]
    classes, size = shapes[last][0], shapes[last][1:]
    nodes["readout"] = nir.I(r=np.full((classes, *size), 1.0 / dt, np.float32))
    nodes["output"] = nir.Output(output_type=np.array([classes, *size]))
    edges += [(source, "readout") for source in exits[last]] + [("readout", "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges), neurons


def host_side(model, input_size, dt, unit_r, changes, source=None) -> dict:
    """What the host does around the graph (the graph's metadata)."""
    cfg = model.config
    steps = model.timesteps + model.extra_steps
    divide = 1 if (model.readout_sum or steps == 1) else model.timesteps
    return {
        "format": FORMAT,
        "source": None if source is None else str(source),
        "arch": model.arch,
        "dataset": cfg.get("dataset"),
        "num_classes": int(cfg["num_classes"]),
        "discretisation": {
            "method": "forward Euler",
            "dt": dt,
            "neuron": "LIF: v[t] = (1 - dt/tau) v[t-1] + (dt/tau) r I[t]; IF and I: v[t] = v[t-1] + dt r I[t]; "
            "spike when v > v_threshold, then v = v_reset",
            "r": "1 (input weights scaled by tau/dt)" if unit_r else "tau/dt for LIF, 1/dt for IF and I",
        },
        "timesteps": model.timesteps,
        "steps": steps,
        "input": {
            "shape": [int(cfg["in_channels"]), *map(int, input_size)],
            "encoding": cfg.get("encoder"),
            "how": HOST_ENCODINGS.get(cfg.get("encoder"), cfg.get("encoder")),
            "zero_steps_after": model.extra_steps,
            "preprocessing": f"the {cfg.get('dataset')} pipeline's normalisation (as train.py and test.py feed it)",
        },
        "readout": {
            "node": "readout",
            "read_at_step": steps,
            "divide_by": divide,
            "what": "the readout integrator's state after the last step, divided by divide_by: the logits",
        },
        "upsample": {"mode": "bilinear", "align_corners": True, "to": "the input's size (H, W)"},
        "lossy_changes": list(changes),
    }


def is_export_file(path) -> bool:
    """Whether ``path`` is a NIR file written by export-nir (HDF5 whose graph metadata holds our host-side
    dict): the only kind of file --overwrite replaces. Reads the metadata only, never raises."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            text = f["node"]["metadata"][METADATA_KEY][()]
        host = json.loads(text.decode() if isinstance(text, bytes) else text)
        return isinstance(host, dict) and str(host.get("format", "")).startswith("snnseg-nir")
    except Exception:  # not HDF5, not a NIR graph, no metadata of ours: not ours to replace
        return False


def check_output(output, overwrite: bool):
    """An existing ``output`` is replaced only with ``overwrite`` and only if export-nir wrote it: never a
    checkpoint or any other file (ValueError naming it)."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    check_replace(output, "-o", "a NIR file written by export-nir", is_export_file)


def check_input_size(model, input_size, what="--input-size"):
    """(H, W) as ints, each at least the architecture's smallest input (utils/config.py, min_img_size)."""
    if len(input_size) != 2 or any(int(s) <= 0 for s in input_size):
        raise ValueError(f"{what} takes two positive ints H W, got {' '.join(map(str, input_size))}")
    size = tuple(int(s) for s in input_size)
    check_img_size(model.config, what, size)
    return size


def export_model(
    model, output, input_size=None, dt=DEFAULT_DT, lossy=False, unit_r=False, overwrite=False, source=None
):
    """Write ``model`` to ``output`` (.nir, atomically); returns (host-side dict, lines describing lossy changes).

    Refuses (NotExportable, one line) what NIR cannot express unless ``lossy``; an existing ``output``
    unless ``overwrite`` and written by export-nir (never a checkpoint or another file); an input size
    below the architecture's smallest or one that needs more memory than there is (utils/preflight.py)."""
    nir = require_nir()
    output = Path(output)
    check_output(output, overwrite)
    what = "--input-size"
    if input_size is None:
        input_size, what = parse_size(model.config.get("img_size")), "the model's img_size"
        if input_size is None:
            raise ValueError(
                f"the model's img_size is the native size ({model.config.get('img_size')}): give the input size "
                "with --input-size H W"
            )
    input_size = check_input_size(model, input_size, what)
    preflight.check_export_memory(model.config, input_size, lower="--input-size" if what == "--input-size" else what)
    problems = export_problems(model, input_size)
    hard = [p for p in problems if p[3] is None]
    if hard or (problems and not lossy):
        raise NotExportable(_refusal((hard or problems)[0]))
    layers = {}  # change -> the layers it applies to, in order
    for layer, _, _, change in problems:
        layers.setdefault(change, []).append(layer)
    changes = [f"{change} ({', '.join(names)})" for change, names in layers.items()]
    model = model.eval()
    with torch.no_grad():
        graph, _ = build_graph(model, input_size, dt, unit_r)
    host = host_side(model, input_size, dt, unit_r, changes, source)
    graph.metadata = {METADATA_KEY: json.dumps(host)}
    with atomic_path(output) as tmp:
        nir.write(str(tmp), graph)
    return host, changes


def read_host_side(graph) -> dict:
    """The host-side dict stored by ``export_model`` in a graph read back with ``nir.read``."""
    text = (graph.metadata or {}).get(METADATA_KEY)
    if text is None:
        raise ValueError(f"the NIR graph has no '{METADATA_KEY}' metadata (not written by export-nir)")
    return json.loads(text.decode() if isinstance(text, bytes) else text)


# --------------------------------------------------------------------------------------------- CLI
def add_export_args(parser):
    parser.add_argument("path", help="SNN checkpoint (trained, or converted with test.py --conversion --save_snn)")
    parser.add_argument("-o", "--output", required=True, help="the .nir file to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output file (only a NIR file export-nir wrote)"
    )
    parser.add_argument(
        "--lossy", action="store_true", help="export what NIR cannot express exactly anyway, printing what changes"
    )
    parser.add_argument(
        "--dt", type=float, default=DEFAULT_DT, help=f"Euler step of the NIR time constants ({DEFAULT_DT:g})"
    )
    parser.add_argument(
        "--unit-r",
        "--unit_r",
        action="store_true",
        help="write r = 1 with tau/dt folded into the weights (readers that ignore r, e.g. Norse)",
    )
    parser.add_argument(
        "--input-size", "--input_size", type=int, nargs=2, metavar=("H", "W"), help="input size (native-size models)"
    )


def run_export(args):
    """converter.py export-nir."""
    require_nir()  # before loading anything
    output = Path(args.output)
    check_output(output, args.overwrite)
    if args.dt <= 0:
        raise ValueError(f"--dt must be > 0, got {args.dt}")
    if args.input_size is not None and min(args.input_size) <= 0:
        raise ValueError(f"--input-size takes two positive ints H W, got {' '.join(map(str, args.input_size))}")
    model = load_model(args.path)
    host, changes = export_model(
        model, output, args.input_size, args.dt, args.lossy, args.unit_r, args.overwrite, source=args.path
    )
    for line in changes:
        print(f"lossy: {line}")
    shape = "x".join(map(str, host["input"]["shape"]))
    print(
        f"wrote {output}: {model.arch}, input {shape}, {host['steps']} steps, "
        f"readout / {host['readout']['divide_by']}, then bilinear upsampling to the input size "
        f"(host side in the file's metadata '{METADATA_KEY}')"
    )
