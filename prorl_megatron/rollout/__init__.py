"""Rollouts with vLLM, colocated with training, and weight sync from Megatron into the engine."""
