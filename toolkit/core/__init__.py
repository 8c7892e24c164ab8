"""Torch-free pieces every stage shares: the Meta record, image decoding, metrics, progress, pictures.

Imports no stage and never torch (tests/test_layers.py holds this)."""
