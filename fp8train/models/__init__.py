"""Model definitions. They contain no fp8 or parallelism code; those are applied afterwards."""

from fp8train.models.llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
