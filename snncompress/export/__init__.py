"""How a trained spiking model leaves PyTorch: its T time steps unrolled into one static graph (:mod:`.unroll`),
BatchNorm and closed gates folded into the convs (:mod:`.fold`), written as ONNX (:mod:`.onnx`) or as NIR for
neuromorphic hardware (:mod:`.nir`). The export stage writes and verifies these; the runtimes run them."""
