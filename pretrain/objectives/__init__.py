"""Objectives: masking and negatives, the wav2vec 2.0 and data2vec loss functions, the EMA teacher
and the per-model training tasks. Imports `pretrain.models`, `pretrain.config` and
`pretrain.distributed`, never `pretrain.training`."""
