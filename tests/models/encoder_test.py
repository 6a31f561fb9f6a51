"""Tests for jaxsearch.models.encoder: parity with transformers' BertModel (all-MiniLM-L6-v2 and
tiny random checkpoints), pooling, checkpoint errors, config validation, logical axes."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file
import torch
import transformers

from jaxsearch.models.encoder import BertEncoder
from jaxsearch.models.encoder import EncoderConfig
from jaxsearch.models.encoder import init_encoder_params
from jaxsearch.models.encoder import load_hf_bert
from jaxsearch.models.encoder import load_minilm
from jaxsearch.models.encoder import minilm_path
from jaxsearch.models.encoder import pool

_AXES = {"vocab", "embed", "heads", "head_dim", "mlp", "norm", None}
_SENTENCES = [
    "Sesdavor Works is a toy company based in Trubepe.",
    "In which country is Sesdavor Works based?",
    "Hello!",
    "A much longer sentence, with punctuation; numbers like 1234 and UPPER case words too.",
]


def _reference_embedding(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """sentence-transformers' Pooling(mean) + Normalize, written out in NumPy (float64)."""
  m = mask[..., None].astype(np.float64)
  emb = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def _embed_fns(config: EncoderConfig):
  model = BertEncoder(config)
  hidden_fn = jax.jit(lambda p, i, m, t=None: model.apply({"params": p}, i, m, t))
  embed_fn = jax.jit(lambda p, i, m, t=None: model.apply({"params": p}, i, m, t,
                                                         method=BertEncoder.embed))
  return hidden_fn, embed_fn


def _random_params(cfg: EncoderConfig, seed: int = 0):
  """Seeded NumPy params on the encoder's own tree (no init compilation): N(0, 0.1)
  kernels and embeddings, norm scales near 1, non-zero biases."""
  ids = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(BertEncoder(cfg).init, jax.random.key(0), ids, ids)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(abstract)["params"])
  out = {}
  for path, leaf in flat.items():
    x = rng.normal(0.0, 0.1, leaf.shape)
    out[path] = jnp.asarray(1.0 + x if path[-1] == "scale" else x, leaf.dtype)
  return traverse_util.unflatten_dict(out)


def _tiny_hf_config(**kw) -> transformers.BertConfig:
  base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64, type_vocab_size=3,
              layer_norm_eps=1e-12)
  base.update(kw)
  return transformers.BertConfig(**base)


def _save_tiny(model_cls=transformers.BertModel, dtype=None, seed=0, **kw) -> tuple[str, object]:
  torch.manual_seed(seed)
  model = model_cls(_tiny_hf_config(**kw)).eval()
  # Random (not zero / one) biases and norm parameters, so every converted tensor matters.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = tempfile.mkdtemp()
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(path)
  return path, model


class MiniLMParityTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cls.enc = tok(_SENTENCES, padding=True, return_tensors="np")
    hf = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
      out = hf(input_ids=torch.tensor(cls.enc["input_ids"]),
               attention_mask=torch.tensor(cls.enc["attention_mask"]))
    cls.hf_hidden = out.last_hidden_state.numpy()
    cls.config, cls.params = load_minilm()

  def test_config(self):
    cfg = self.config
    self.assertEqual((cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                      cfg.intermediate_size, cfg.max_position),
                     (30522, 384, 6, 12, 1536, 512))
    self.assertEqual((cfg.pooling, cfg.normalize), ("mean", True))  # from modules.json

  def test_hidden_and_embedding_match_transformers(self):
    ids, mask = self.enc["input_ids"], self.enc["attention_mask"]
    self.assertGreater((mask == 0).sum(), 10)  # the batch has padding
    hidden_fn, embed_fn = _embed_fns(self.config)
    hidden = np.asarray(hidden_fn(self.params, ids, mask))
    valid = mask.astype(bool)
    # Padded positions are junk states that even HF's own sdpa and eager attention disagree
    # on (~4e-5); they never reach the pooled embedding. Compare every real token.
    np.testing.assert_allclose(hidden[valid], self.hf_hidden[valid], atol=1e-5, rtol=0)
    emb = np.asarray(embed_fn(self.params, ids, mask))
    np.testing.assert_allclose(emb, _reference_embedding(self.hf_hidden, mask), atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)

  def test_embedding_ignores_extra_padding(self):
    ids, mask = self.enc["input_ids"][:1], self.enc["attention_mask"][:1]
    n = int(mask.sum())
    _, embed_fn = _embed_fns(self.config)
    tight = embed_fn(self.params, ids[:, :n], mask[:, :n])
    padded = embed_fn(self.params, np.pad(ids[:, :n], ((0, 0), (0, 7))),
                      np.pad(mask[:, :n], ((0, 0), (0, 7))))
    np.testing.assert_allclose(tight, padded, atol=2e-6)


class TinyBertParityTest(parameterized.TestCase):

  def _compare(self, path, hf_model, token_types=False, atol=1e-5):
    config, params = load_hf_bert(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    ids = np.where(mask == 1, ids, 0)
    types = rng.integers(0, 3, size=ids.shape) if token_types else None
    with torch.no_grad():
      ref = hf_model.float()(
          input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
          token_type_ids=None if types is None else torch.tensor(types))
      ref = (ref.last_hidden_state if hasattr(ref, "last_hidden_state")
             else ref.hidden_states[-1]).numpy()
    hidden_fn, embed_fn = _embed_fns(config)
    hidden = np.asarray(hidden_fn(params, ids, mask, types))
    valid = mask.astype(bool)
    np.testing.assert_allclose(hidden[valid], ref[valid], atol=atol, rtol=0)
    np.testing.assert_allclose(embed_fn(params, ids, mask, types),
                               _reference_embedding(ref, mask), atol=atol, rtol=0)
    return config, params

  def test_bert_model_with_token_types(self):
    path, model = _save_tiny()
    config, _ = self._compare(path, model, token_types=True)
    self.assertEqual((config.hidden_size, config.num_layers, config.intermediate_size,
                      config.type_vocab_size), (32, 2, 37, 3))
    # No sentence-transformers files: the defaults.
    self.assertEqual((config.pooling, config.normalize), ("mean", True))

  def test_masked_lm_checkpoint_with_bert_prefix_and_heads(self):
    path, model = _save_tiny(transformers.BertForMaskedLM)
    keys = load_file(os.path.join(path, "model.safetensors")).keys()
    self.assertTrue(any(k.startswith("bert.") for k in keys))
    self.assertTrue(any(k.startswith("cls.") for k in keys))
    self._compare(path, model.bert)     # the trunk without the MLM head

  def test_bf16_checkpoint(self):
    path, model = _save_tiny(dtype=torch.bfloat16)
    # The jaxsearch params must be exactly the bf16 weights (upcast); compare against the
    # same bf16 weights run in fp32 by torch.
    self._compare(path, model)
    _, params_bf16 = load_hf_bert(path, param_dtype="bfloat16")
    word = params_bf16["embeddings"]["word_embeddings"]["embedding"]
    self.assertEqual(word.dtype, jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(word, np.float32),
        model.embeddings.word_embeddings.weight.float().detach().numpy())

  def test_cls_pooling_is_first_hidden_state_normalised(self):
    path, _ = _save_tiny()
    config, params = load_hf_bert(path, pooling="cls", normalize=True)
    ids = np.array([[5, 6, 7, 0]])
    mask = np.array([[1, 1, 1, 0]])
    hidden_fn, embed_fn = _embed_fns(config)
    h0 = np.asarray(hidden_fn(params, ids, mask))[:, 0]
    np.testing.assert_allclose(embed_fn(params, ids, mask),
                               h0 / np.linalg.norm(h0, axis=-1, keepdims=True), atol=1e-6)

  def test_unsupported_config_raises(self):
    path, _ = _save_tiny(hidden_act="relu")
    with self.assertRaisesRegex(ValueError, "hidden_act.*'relu'"):
      load_hf_bert(path)


class MalformedCheckpointTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.path, _ = _save_tiny()
    self.file = os.path.join(self.path, "model.safetensors")
    self.tensors = load_file(self.file)

  def _rewrite(self, tensors):
    save_file(tensors, self.file, metadata={"format": "pt"})

  def test_missing_key(self):
    key = "encoder.layer.1.attention.self.value.bias"
    del self.tensors[key]
    self._rewrite(self.tensors)
    with self.assertRaisesRegex(ValueError, "missing.*" + key.replace(".", r"\.")):
      load_hf_bert(self.path)

  def test_wrong_shape(self):
    key = "encoder.layer.0.intermediate.dense.weight"
    self.tensors[key] = np.zeros((36, 32), np.float32)
    self._rewrite(self.tensors)
    with self.assertRaisesRegex(ValueError, key.replace(".", r"\.") + r".*\(36, 32\).*"
                                r"\(37, 32\)"):
      load_hf_bert(self.path)

  def test_unexpected_key(self):
    self.tensors["encoder.layer.2.output.dense.weight"] = np.zeros((32, 37), np.float32)
    self._rewrite(self.tensors)
    with self.assertRaisesRegex(ValueError, r"unexpected.*encoder\.layer\.2\.output"):
      load_hf_bert(self.path)

  def test_wrong_model_type(self):
    with open(os.path.join(self.path, "config.json")) as f:
      hf = json.load(f)
    hf["model_type"] = "roberta"
    with open(os.path.join(self.path, "config.json"), "w") as f:
      json.dump(hf, f)
    with self.assertRaisesRegex(ValueError, "model_type.*'roberta'"):
      load_hf_bert(self.path)

  def test_no_weights(self):
    os.remove(self.file)
    with self.assertRaisesRegex(FileNotFoundError, "safetensors"):
      load_hf_bert(self.path)


class EncoderConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("vocab", dict(vocab_size=0), "vocab_size"),
      ("heads", dict(num_heads=3), "divisible by num_heads"),
      ("act", dict(activation="relu"), "activation"),
      ("pooling", dict(pooling="max"), "pooling.*'max'"),
      ("normalize", dict(normalize=1), "normalize"),
      ("dropout", dict(dropout_rate=1.0), "dropout_rate"),
      ("dtype", dict(dtype="float8"), "dtype.*'float8'"),
      ("eps", dict(layer_norm_eps=0.0), "layer_norm_eps"))
  def test_invalid(self, kw, pattern):
    base = dict(vocab_size=50, hidden_size=32, num_heads=4)
    base.update(kw)
    with self.assertRaisesRegex(ValueError, pattern):
      EncoderConfig(**base)

  def test_too_long_input_raises(self):
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2, max_position=8)
    params = _random_params(cfg)
    ids = jnp.zeros((1, 9), jnp.int32)
    with self.assertRaisesRegex(ValueError, "max_position=8"):
      jax.eval_shape(BertEncoder(cfg).apply, {"params": params}, ids, jnp.ones_like(ids))


class LogicalAxesAndPoolingTest(absltest.TestCase):

  def test_every_param_has_logical_axes(self):
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=24, max_position=8)
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(BertEncoder(cfg).init, jax.random.key(0), ids, ids)["params"]
    flat = traverse_util.flatten_dict(abstract)
    for path, leaf in flat.items():
      self.assertIsInstance(leaf, nn.Partitioned, path)
      self.assertLen(leaf.names, leaf.value.ndim, path)
      self.assertContainsSubset(set(leaf.names), _AXES, path)
    q = flat[("layers_0", "attn", "query", "kernel")]
    self.assertEqual(q.names, ("embed", "heads", "head_dim"))
    self.assertEqual(q.value.shape, (16, 2, 8))
    self.assertEqual(flat[("embeddings", "word_embeddings", "embedding")].names,
                     ("vocab", "embed"))

  def test_sharded_embedding_equals_single_device(self):
    from jaxsearch.train import sharding  # noqa: PLC0415
    if jax.device_count() < 8:
      self.skipTest("needs 8 (fake) devices")
    cfg = EncoderConfig(vocab_size=64, hidden_size=32, num_heads=4, intermediate_size=64,
                        max_position=16)
    params = _random_params(cfg)
    ids = np.random.default_rng(0).integers(1, 64, size=(8, 16))
    mask = (np.arange(16)[None] < np.arange(9, 17)[:, None]).astype(np.int32)
    ref = _embed_fns(cfg)[1](params, ids, mask)
    model = BertEncoder(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = sharding.param_shardings(nn.get_partition_spec(abstract)["params"], mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      sharded = jax.device_put(params, shardings)
      emb = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m,
                                                method=BertEncoder.embed))(sharded, ids, mask)
    self.assertEqual(sharded["layers_0"]["attn"]["query"]["kernel"].sharding.spec,
                     jax.sharding.PartitionSpec("fsdp", "tensor", None))
    np.testing.assert_allclose(emb, ref, atol=1e-6)

  def test_init_encoder_params_is_unboxed_and_bert_scaled(self):
    cfg = EncoderConfig(vocab_size=500, hidden_size=16, num_layers=1, num_heads=2,
                        intermediate_size=24, max_position=8)
    params = init_encoder_params(cfg, jax.random.key(0))
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
      self.assertIsInstance(leaf, jax.Array)
    word = params["embeddings"]["word_embeddings"]["embedding"]
    self.assertAlmostEqual(float(jnp.std(word)), 0.02, delta=0.003)
    np.testing.assert_array_equal(params["layers_0"]["mlp_norm"]["scale"], np.ones(16))

  def test_mean_pool_by_hand(self):
    h = jnp.array([[[3.0, 4.0], [1.0, 0.0], [100.0, 100.0]]])   # third token is padding
    np.testing.assert_allclose(pool(h, jnp.array([[1, 1, 0]]), normalize=False), [[2.0, 2.0]])
    np.testing.assert_allclose(pool(h, jnp.array([[1, 0, 0]])), [[0.6, 0.8]], atol=1e-7)
    np.testing.assert_allclose(pool(h, jnp.array([[0, 1, 1]]), pooling="cls"), [[0.6, 0.8]],
                               atol=1e-7)

  def test_bf16_compute_is_close_to_fp32(self):
    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_heads=4, intermediate_size=64,
                        max_position=16)
    params = _random_params(cfg, seed=1)
    ids = np.random.default_rng(2).integers(1, 50, size=(2, 10))
    mask = np.ones_like(ids)
    e32 = _embed_fns(cfg)[1](params, ids, mask)
    e16 = _embed_fns(dataclasses.replace(cfg, dtype="bfloat16"))[1](params, ids, mask)
    self.assertEqual(e16.dtype, jnp.float32)
    np.testing.assert_allclose(e16, e32, atol=0.05)


if __name__ == "__main__":
  absltest.main()
