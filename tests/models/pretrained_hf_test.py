"""`load_pretrained("hf:DIR")`: a tiny random Hugging Face checkpoint directory (weights from
transformers, tokenizer files from `tokenizers`) becomes a policy whose logits, chat ids and
stop ids are transformers' own."""
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from absl.testing import absltest, parameterized

from jaxsearch.data.tokenizer_format import TAGS
from jaxsearch.models.pretrained import load_pretrained
from jaxsearch.models.transformer import Transformer
from tests.data.hf_tokenizer_fixtures import write_tokenizer_dir
from tests.models import hf_fixtures as fx
from tests import compiled

# architecture -> tokenizer style; the tables have spare rows past the tokenizer's ids
# (as Qwen's 151,936 rows for 151,665 tokens), except Llama's, which the tags then grow.
CASES = {"qwen3_tied": ("qwen3", 320), "qwen2_bias_untied": ("chatml", 320),
         "llama_rope_llama3": ("llama3", 305)}
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is Paris?"}]


def checkpoint_dir(name: str) -> tuple[str, object]:
  style, vocab = CASES[name]
  model = fx.build(name, vocab_size=vocab)
  path = fx.save(model)
  write_tokenizer_dir(path, style)
  return path, model


class HFPolicyTest(parameterized.TestCase):

  @parameterized.parameters(*CASES)
  def test_logits_chat_ids_and_stop_ids_are_transformers(self, name):
    path, torch_model = checkpoint_dir(name)
    config, params, tok = load_pretrained(f"hf:{path}", add_tags=False)
    self.assertEqual(config.vocab_size, CASES[name][1])
    self.assertLessEqual(tok.vocab_size, config.vocab_size)
    ids = fx.tokens(tok.vocab_size, length=12)
    logits = compiled.apply(Transformer(config), {"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(logits, fx.torch_logits(torch_model, ids), atol=1e-4, rtol=0)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    want = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    self.assertEqual(tok.apply_chat_template(MESSAGES, add_generation_prompt=True), want)
    with open(os.path.join(path, "generation_config.json")) as f:
      eos = json.load(f)["eos_token_id"]
    self.assertEqual(set(tok.eos_ids), set(eos if isinstance(eos, list) else [eos]))

  @parameterized.parameters(*CASES)
  def test_added_tags_get_the_mean_row_and_leave_other_logits(self, name):
    path, _ = checkpoint_dir(name)
    base_config, base, _ = load_pretrained(f"hf:{path}", add_tags=False)
    config, params, tok = load_pretrained(f"hf:{path}", add_tags=True)
    start = tok.base_vocab_size
    # Tags the vocabulary already has (Qwen3's <think>) keep their ids and trained rows.
    tag_ids = [tok.tag_id(t) for t in TAGS if tok.tag_id(t) >= start]
    self.assertEqual(sorted(tag_ids), list(range(start, tok.vocab_size)))
    self.assertGreaterEqual(len(tag_ids), 6)
    self.assertEqual(config.vocab_size, max(base_config.vocab_size, tok.vocab_size))
    self.assertEqual(config.vocab_size > base_config.vocab_size, name.startswith("llama"))
    emb, base_emb = np.asarray(params["embed"]["embedding"]), np.asarray(base["embed"]["embedding"])
    mean = base_emb[:start].mean(0)
    for i in tag_ids:
      np.testing.assert_allclose(emb[i], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(emb[:start], base_emb[:start])
    if "lm_head" in params:
      np.testing.assert_allclose(np.asarray(params["lm_head"]["kernel"])[:, tag_ids[0]],
                                 np.asarray(base["lm_head"]["kernel"])[:, :start].mean(1),
                                 rtol=1e-6, atol=1e-6)
    ids = jnp.asarray(fx.tokens(start, length=8))
    a = compiled.apply(Transformer(config), {"params": params}, ids)[..., :start]
    b = compiled.apply(Transformer(base_config), {"params": base}, ids)[..., :start]
    np.testing.assert_allclose(a, b, atol=1e-5)

  def test_bf16(self):
    path, _ = checkpoint_dir("qwen3_tied")
    config, params, _ = load_pretrained(f"hf:{path}", dtype="bfloat16", add_tags=False)
    self.assertEqual((config.dtype, config.param_dtype), ("bfloat16", "bfloat16"))
    self.assertTrue(all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params)))

  def test_tokenizer_larger_than_the_table_is_named(self):
    path, _ = checkpoint_dir("qwen3_tied")
    with open(os.path.join(path, "config.json")) as f:
      cfg = json.load(f)
    small = fx.save(fx.build("qwen3_tied", vocab_size=200))
    write_tokenizer_dir(small, "qwen3")
    with self.assertRaisesRegex(ValueError, r"tokenizer.json has \d+ ids but the embedding table "
                                r"has 200 rows .*config.json.*'vocab_size'"):
      load_pretrained(f"hf:{small}")
    self.assertEqual(cfg["vocab_size"], 320)

  def test_missing_files_are_named(self):
    path = fx.save(fx.build("qwen3_tied", vocab_size=320))
    with self.assertRaisesRegex(FileNotFoundError, "tokenizer.json"):
      load_pretrained(f"hf:{path}")
    with self.assertRaisesRegex(FileNotFoundError, "not a directory"):
      load_pretrained(f"hf:{os.path.join(tempfile.gettempdir(), 'no-such-ckpt')}")
    with self.assertRaisesRegex(ValueError, "'hf:/path/to/checkpoint_dir'"):
      load_pretrained("qwen-7b")


if __name__ == "__main__":
  absltest.main()
