"""Megatron-Core GPT models built from Hugging Face configs, and their forward/logprob passes."""
