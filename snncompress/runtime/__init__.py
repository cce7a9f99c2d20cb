"""Where an exported model runs: CPU runtime sessions (onnxruntime; OpenVINO, an optional extra imported only
when asked for), timing, and latency tables of layers measured on them (``prune.budget_unit: latency``)."""
