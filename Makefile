# Two entry points: `make demo` (the main job on the synthetic corpus) and `make test`.
PYTHON ?= python3
# Install the torch build that suits the machine first (CPU or CUDA); this spec is used only
# when no torch is importable yet.
TORCH ?= torch
WORK ?= runs/demo

.PHONY: install demo test bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) -m data_prep toy $(WORK)/corpus
	$(PYTHON) -m data_prep librispeech $(WORK)/corpus $(WORK)/manifests \
		--finetuning-root $(WORK)/corpus/librispeech_finetuning --num-shards 2 --pack
	$(PYTHON) -m pretrain --preset wav2vec2_tiny --data $(WORK)/manifests --out $(WORK)/wav2vec2
	$(PYTHON) -m pretrain.export $(WORK)/wav2vec2 --format hf --out $(WORK)/wav2vec2-hf

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/data_loading.py
	$(PYTHON) benchmarks/wav2vec2_step.py

clean:
	rm -rf runs .pytest_cache
