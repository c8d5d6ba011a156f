"""prorl-megatron: ProRL (prolonged GRPO with reference resets) on Megatron-Core and vLLM.

Importing the package imports nothing heavy: each subpackage pulls in its own dependencies
(``algo`` needs torch only; models, rollout and checkpoints need megatron-core and vLLM).
"""

__version__ = "0.1.0"
