# Two entry points: `make demo` (the main job on the synthetic corpus) and `make test`.
PYTHON ?= python3
# Install the torch build that suits the machine first (CPU or CUDA); this spec is used only
# when no torch is importable yet.
TORCH ?= torch
WORK ?= runs/demo

.PHONY: install demo pipeline test bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install pipeline

# The main job itself: synthetic corpus -> prep (transcribed LibriSpeech layout, and the unlabelled
# Libri-Light layout cut by its VAD, merged for pretraining) -> pretraining -> CTC fine-tuning ->
# evaluation (greedy, and beam search with a word LM whose weights were picked on dev-other) ->
# transformers export -> summary -> run reports (plots and health verdicts, under each run's
# report/). About 2.5 minutes on 2 CPU cores.
pipeline:
	$(PYTHON) -m data_prep toy $(WORK)/corpus
	$(PYTHON) -m data_prep librispeech $(WORK)/corpus $(WORK)/manifests \
		--finetuning-root $(WORK)/corpus/librispeech_finetuning
	$(PYTHON) -m data_prep librilight $(WORK)/corpus/librilight $(WORK)/librilight --segment-seconds 4
	$(PYTHON) -m data_prep merge $(WORK)/manifests $(WORK)/librilight --out $(WORK)/unlabelled \
		--num-shards 2 --pack
	$(PYTHON) -m pretrain --preset wav2vec2_tiny --data $(WORK)/unlabelled --out $(WORK)/wav2vec2
	$(PYTHON) -m finetune --preset ctc_tiny --init-from $(WORK)/wav2vec2 --data $(WORK)/manifests --out $(WORK)/ctc
	$(PYTHON) -m finetune.ngram $(WORK)/manifests/train.wrd --order 2 --out $(WORK)/lm.arpa
	$(PYTHON) -m finetune.evaluate $(WORK)/ctc --data $(WORK)/manifests
	$(PYTHON) -m finetune.evaluate $(WORK)/ctc --data $(WORK)/manifests --lm $(WORK)/lm.arpa \
		--lm-weight 0.5 --word-score 1
	$(PYTHON) -m finetune.export $(WORK)/ctc --format hf --out $(WORK)/ctc-hf
	$(PYTHON) -m finetune.summary $(WORK)
	$(PYTHON) -m pretrain.report $(WORK)/wav2vec2
	$(PYTHON) -m finetune.report $(WORK)/ctc

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/data_loading.py
	$(PYTHON) benchmarks/wav2vec2_step.py
	$(PYTHON) benchmarks/librilight_segment.py

clean:
	rm -rf runs .pytest_cache
