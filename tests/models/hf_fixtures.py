"""Tiny random Hugging Face Llama / Qwen2 / Qwen3 checkpoints built offline with transformers + torch.

Test helper of `hf_test.py`. transformers initialises weights with std 0.02 and zero biases,
which makes every logit near zero; `randomize_` redraws them at unit scale so that parity
tests at 1e-4 actually constrain the conversion.

Example:
  >>> model = build("qwen2_bias_tied")                       # torch Qwen2ForCausalLM, fp32
  >>> path = save(model, max_shard_size="8KB")                # several shards + index json
  >>> ref = torch_logits(model, tokens)                       # [B, T, V] np.float32
"""
from __future__ import annotations

import math
import tempfile

import numpy as np
import torch
import transformers

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)

# name -> (family, config kwargs on top of _BASE)
ARCHITECTURES = {
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_gqa_untied": ("llama", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama_mqa": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen2_bias_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_bias_untied": ("qwen2", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "llama_head_dim": ("llama", dict(num_key_value_heads=2, head_dim=16,
                                     tie_word_embeddings=False)),
    "llama_rope_linear": ("llama", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "llama_rope_llama3": ("llama", dict(
        num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    # Qwen3: q/k RMSNorm per head, explicit head_dim (not D / H), no q/k/v bias by default.
    "qwen3_tied": ("qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    "qwen3_mqa_untied": ("qwen3", dict(
        num_key_value_heads=1, head_dim=4, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def hf_config(name: str, **overrides) -> transformers.PreTrainedConfig:
  """The transformers config of architecture `name` (see ARCHITECTURES)."""
  family, kwargs = ARCHITECTURES[name]
  config_cls, _ = _CLASSES[family]
  kw = dict(_BASE, **kwargs)
  kw.update(overrides)
  return config_cls(**kw)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Redraws weights in place: Linear ~ N(0, 1/fan_in), embedding ~ N(0, 1), norm scales
  ~ 1 + 0.2 N(0, 1), biases ~ 0.3 N(0, 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        value = 1.0 + 0.2 * noise
      elif name.endswith(".bias"):
        value = 0.3 * noise
      elif "embed_tokens" in name:
        value = noise
      else:
        value = noise / math.sqrt(p.shape[1])
      p.copy_(value.to(p.dtype))
  return model


def build(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
  """A randomized float32 `*ForCausalLM` in eval mode."""
  family, _ = ARCHITECTURES[name]
  _, model_cls = _CLASSES[family]
  torch.manual_seed(seed)
  return randomize_(model_cls(hf_config(name, **overrides)), seed).eval()


def save(model: torch.nn.Module, max_shard_size: str | None = None) -> str:
  """`save_pretrained` into a fresh temporary directory; returns it."""
  path = tempfile.mkdtemp(prefix="hf_ckpt_")
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kwargs)
  return path


def tokens(vocab_size: int, batch: int = 2, length: int = 10, seed: int = 1) -> np.ndarray:
  """Random token ids [batch, length] int32."""
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, length)).astype(np.int32)


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
  """transformers' logits [B, T, V] as float32 numpy (full causal forward, no padding)."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)))
  return out.logits.float().numpy()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """HF-named float32 numpy copies of the model's weights (tied lm_head included)."""
  return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
