"""Corpus preparation (LibriSpeech, Libri-Light, a synthetic corpus) and the shared audio data loader."""
