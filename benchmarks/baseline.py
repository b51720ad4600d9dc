"""The per-timestep baseline: a SegmentationNet run the way the paper's code runs it.

Every layer is called once per timestep (T small convolutions where the network makes one large one),
BN is one call per timestep (BNTT) and the neurons are their plain per-step tensor ops recorded by
autograd (the generic path), so backward walks T copies of the graph (backpropagation through time).
Plain PyTorch layers throughout (``F.conv2d``, ``F.avg_pool2d``), not the project's memory-saving ones: this
is what the multi-step network is measured against. The model itself runs this way (``per_timestep``,
models/network.py), so any architecture has its baseline, on the same weights, and tests/test_bench.py
checks that the two agree.
"""


def per_timestep_forward(model, images):
    """Logits of the spiking SegmentationNet ``model`` for ``images``, one timestep at a time."""
    with model.per_timestep():
        return model(images)
