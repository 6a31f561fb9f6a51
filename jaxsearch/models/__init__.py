"""Models: the policy transformer, its value / reward heads, encoders, checkpoint import/export.

Example:
  >>> from jaxsearch import models
  >>> model, params = models.load_hf_checkpoint("/path/to/Qwen2.5-0.5B")     # local HF dir
  >>> logits = model.apply({"params": params}, tokens)                      # [B, T, V]
  >>> models.save_hf_checkpoint(model, params, "/tmp/export")               # for vLLM / HF
"""
from jaxsearch.models.hf import load_hf_checkpoint, save_hf_checkpoint
from jaxsearch.models.transformer import (KVCache, Transformer, TransformerConfig, init_cache,
                                          make_decode_fn)

__all__ = ["KVCache", "Transformer", "TransformerConfig", "init_cache", "load_hf_checkpoint",
           "make_decode_fn", "save_hf_checkpoint"]
