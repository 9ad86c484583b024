"""Interop: state-dict and config conversion to and from Hugging Face transformers and fairseq2.
Imports `pretrain.config` and `pretrain.models` only."""
