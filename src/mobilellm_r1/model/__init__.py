"""The MobileLLM-R1 decoder, its KV cache, generation, checkpoint IO and Hugging Face interop.

- :mod:`.transformer`: :class:`Transformer` (dense Llama-4-text style decoder) and :class:`KVCache`.
- :mod:`.generate`: batched generation with a pre-allocated KV cache.
- :mod:`.io`: our checkpoint directory (``model.safetensors`` + ``config.json``), written atomically.
- :mod:`.hf`: export to / import from a directory ``transformers`` loads as ``Llama4ForCausalLM``.
"""

from .transformer import KVCache, Transformer, long_context_config

__all__ = ["KVCache", "Transformer", "long_context_config"]
