"""Models: the conv front end, positional convolution, transformer encoder, quantizer, wav2vec 2.0
and data2vec networks, their FLOP counts and CPU kernels. Imports only `pretrain.config`."""
