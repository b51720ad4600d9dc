"""The layer graph: which part feeds which, and what each tensor holds, found by running the network once.

A ``Recorder`` hooks a model's outer parts (models/protocol.py): every call's inputs and output, and which
call made each tensor (by identity: a part's output is the next part's input). ``layer_graph`` runs one
timestep of a zero input through it and asks every part what its output holds (``Part.activity``); the
result tells the tools, for every layer, where its inputs come from and whether its convolutions receive
spikes (of how many levels), pooled spikes or analog values: declared by the parts, never guessed from
values. What the graph cannot follow is a problem for every tool that needs it, found before any data is
read: a part's input made by an operation outside the parts (a plain ``+`` or ``torch.cat`` between two
parts), a module that computes without being a part, a part that does not declare its output.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from . import protocol
from .neurons import Neuron
from .protocol import NotSupported

INPUT = "input"  # the producer of the network's (encoded) input


@dataclass
class Call:
    """One call of a part: its name, the part, its tensor inputs and its output."""

    name: str
    part: nn.Module
    inputs: list
    output: object


class Recorder:
    """Watches a model's forward passes (as a context manager): ``calls`` of the last forward, in order, and
    ``producer(tensor)``: the Call that made a tensor, ``INPUT``, or None (made outside the parts)."""

    def __init__(self, model):
        self.model = model
        self.names = {part: name for name, part in model.parts()}
        self._handles, self._keep = [], []
        self.calls, self.producers = [], {}
        self.strangers = {}  # name -> module: modules outside the parts that ran

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(lambda *_: self.reset()))
        for part in self.names:
            self._handles.append(part.register_forward_hook(self._on_call))
        for name, module in self._loose_modules():
            self._handles.append(
                module.register_forward_hook(lambda m, a, o, name=name: self.strangers.update({name: m}))
            )
        self.model._observers.append(self)
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.model._observers.remove(self)
        self.reset()

    def reset(self):
        self.calls, self.producers, self._keep = [], {}, []

    def _loose_modules(self):
        """Leaf modules that are neither parts nor inside one (nor the input encoder)."""
        inside = tuple(f"{name}." for name in self.names.values()) + ("encoder",)
        for name, module in self.model.named_modules():
            if name and not list(module.children()) and module not in self.names and not name.startswith(inside):
                yield name, module

    def _on_call(self, part, args, output):
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        call = Call(self.names[part], part, inputs, output)
        self.calls.append(call)
        self._note(output, call)

    def _note(self, tensor, producer):
        self._keep.append(tensor)  # alive until reset: ids stay unique
        self.producers[id(tensor)] = producer

    def block_input(self, tensor):
        self._note(tensor, INPUT)

    def alias(self, new, old):
        """``new`` is a linear function of ``old`` alone (a sum over time, a time-mean): same producer."""
        if id(old) in self.producers:
            self._note(new, self.producers[id(old)])

    def producer(self, tensor):
        return self.producers.get(id(tensor))


@dataclass(eq=False)
class Node:
    """A layer in the graph: ``inputs`` are the producing Nodes (or INPUT, or None where the graph loses the
    trail), ``activity`` what its output holds (None with a ``problem``)."""

    name: str
    part: nn.Module
    inputs: list
    input_shapes: list
    output_shape: tuple
    input_activities: list = field(default_factory=list)
    activity: Optional[protocol.Activity] = None
    problem: Optional[str] = None


@dataclass
class LayerGraph:
    nodes: list  # in call order
    input_activity: protocol.Activity
    outputs: dict  # output name -> the Node whose output feeds it
    strangers: list  # names of modules that computed outside the parts

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def check(self, tool: str):
        """NotSupported naming the first layer ``tool`` cannot follow (see the module docstring)."""
        if self.strangers:
            raise NotSupported(
                f"layer {self.strangers[0]}: a module that is not a part (models/parts.py, models/protocol.py), "
                f"so {tool} cannot tell what it does; build it from parts or make it a Part"
            )
        for node in self.nodes:
            if node.problem:
                raise NotSupported(f"layer {node.name}: {node.problem} ({tool})")

    def neurons(self):
        """The neuron layers in the order the signal reaches them (a topological order)."""
        seen = []
        for node in self.nodes:
            for module in node.part.modules():
                if isinstance(module, Neuron) and module not in seen:
                    seen.append(module)
        return seen

    def synapse_inputs(self):
        """(node, synapse, activity of what it reads) for every convolution, in call order."""
        for node in self.nodes:
            for synapse in node.part.synapses():
                yield node, synapse, node.input_activities[synapse.input]


def _activity_of(producer, nodes_by_call, input_activity):
    if producer is INPUT:
        return input_activity
    if producer is None:
        return None
    return nodes_by_call[id(producer)].activity


@torch.no_grad()
def layer_graph(model, size=(64, 64)) -> LayerGraph:
    """The layer graph of ``model`` for inputs of ``size`` (H, W): one timestep of zeros, in eval mode."""
    training = model.training
    recording = [(n, n.recording) for n in model.neuron_layers()]
    channels = int(model.config["in_channels"])
    weight = next(model.parameters())
    h = torch.zeros(1, channels, *[int(s) for s in size], device=weight.device, dtype=weight.dtype)
    h = h.contiguous(memory_format=torch.channels_last)
    model.eval()
    model.record_spikes(False)
    try:
        with Recorder(model) as recorder:
            recorder.block_input(h)
            sums, _ = model._run_block(h, 0, 1, [None] * len(recording))
            feeds = {key: recorder.producer(model._readout(key, total, 1)) for key, total in sums.items()}
            return _build_graph(model, recorder, feeds)
    finally:
        model.train(training)
        for neuron, on in recording:
            neuron.recording = on


def _build_graph(model, recorder, feeds) -> LayerGraph:
    input_activity = model.encoder.activity()
    nodes, by_call = [], {}
    for call in recorder.calls:
        producers = [recorder.producer(x) for x in call.inputs]
        node = Node(
            call.name,
            call.part,
            [INPUT if p is INPUT else None if p is None else by_call[id(p)] for p in producers],
            [tuple(x.shape[1:]) for x in call.inputs],
            tuple(call.output.shape[1:]) if isinstance(call.output, torch.Tensor) else (),
        )
        node.input_activities = [_activity_of(p, by_call, input_activity) for p in producers]
        if any(a is None for a in node.input_activities):
            lost = node.input_activities.index(None)
            node.problem = (
                f"its input {lost} is made by an operation outside the parts (a plain '+' or torch.cat between "
                "two layers?); use the parts models.parts.Add, Upsample, ... so that the tools can follow it"
            )
        else:
            try:
                node.activity = call.part.activity(node.input_activities)
            except NotSupported as err:
                node.problem = str(err)
        nodes.append(node)
        by_call[id(call)] = node
    outputs = {key: by_call.get(id(call)) for key, call in feeds.items()}
    return LayerGraph(nodes, input_activity, outputs, sorted(recorder.strangers))
