"""Self-supervised pretraining (wav2vec 2.0, data2vec-audio) on top of `data_prep`'s loader."""
