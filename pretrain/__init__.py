"""Self-supervised pretraining (wav2vec 2.0, data2vec-audio) on top of `data_prep`'s loader.

Layers, each importing only those before it: `config` and `distributed` (foundations) <-
`models` <- `objectives` <- `training`; `interop` sits beside `objectives` (config and models
only); the entry points (`__main__`, `build`, `presets`, `export`, `extract`) may use them all.
`tests/test_layout.py` holds this.
"""
