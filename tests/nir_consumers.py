"""NIR consumers other than spikingjelly, as a user of each would read a file snncompress wrote."""

import contextlib
import copy
import io

import torch.nn as nn

from snncompress.export.nir import Simulator


def snntorch_simulator(graph) -> Simulator:
    """snnTorch 1.0's ``import_nir.import_from_nir``, run step by step from rest for every batch.

    Two things a snnTorch user has to know (documented in the README): its importer prints warnings while it
    rescales the LIF threshold, and it maps NIR's Flatten (whose dims exclude the batch) onto torch's Flatten
    with the same dims, flattening the batch into the features; shifting them by one (or feeding one sample
    at a time) runs batches.
    """
    from snntorch import utils
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):
        module = import_from_nir(copy.deepcopy(graph))
    for m in module.modules():
        if isinstance(m, nn.Flatten):
            m.start_dim += m.start_dim >= 0
            m.end_dim += m.end_dim >= 0
    return Simulator(graph, module, utils.reset)
