"""Checkpoint formats: ``hf`` (factors in a Hugging Face directory, read back by ``from_pretrained``
through a transformers quantizer) and ``dense`` (merged weights). Beside the engine, on the contract."""
