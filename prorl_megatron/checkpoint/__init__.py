"""Checkpoints: the HF <-> Megatron mapping, HF safetensors I/O, megatron dist checkpoints."""
