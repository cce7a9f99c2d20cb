# Development install: CPU torch pinned first, then an exact lock with --no-deps so pip never
# resolves spikingjelly's full requirement set (torchvision/torchaudio CUDA builds crash next to CPU torch).
# The lock includes the optional OpenVINO runtime so the tests run it; its one other requirement,
# openvino-telemetry, is left out: only OpenVINO's model converter reads it, and falls back to a stub.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import torch, spikingjelly.activation_based.neuron, torch_pruning, onnxruntime, openvino, onnxsim, nir, nirtorch, snntorch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	$(VENV)/bin/snncompress run recipes/quickstart.yaml --out runs/quickstart

clean:
	rm -rf $(VENV) runs build *.egg-info
