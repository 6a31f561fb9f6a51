"""`RunConfig.pretrained = "hf:DIR"` through the launcher: a tiny random Qwen3 checkpoint
(transformers weights, `tokenizers` tokenizer, a ChatML template with <think> blocks) warm
starts and takes 2 RL steps with text tags; the trained policy is exported with
`save_hf_checkpoint` and transformers loads it with the same logits."""
import json
import os
import shutil
import tempfile

import jax.numpy as jnp
import jax
import numpy as np
import pytest
import torch
import transformers
from absl.testing import absltest, parameterized

from jaxsearch import metrics as metrics_lib
from jaxsearch.models import lora as lora_lib
from jaxsearch.models.hf import save_hf_checkpoint
from jaxsearch.models.transformer import unstack_layer_params
from jaxsearch.programs.search_agent import workdir as workdir_lib
from tests.data.hf_tokenizer_fixtures import write_tokenizer_dir
from tests.integration.launcher_test import launch
from tests.models import hf_fixtures as fx

RL_STEPS = 2
BINDINGS = (
    "SFT_STEPS = 2", f"RL_STEPS = {RL_STEPS}",
    "search_env.RolloutConfig.max_len = 384", "transformer.TransformerConfig.max_len = 384",
    "experiment.DataConfig.max_passage_tokens = 24",
    "steps.PolicyGradientConfig.micro_batch_size = 2",     # 4 episodes per step here
    'prompts.PromptConfig.instruction = "Search with <search> q </search>, answer with '
    '<answer> a </answer>. {question}"',
    'prompts.PromptConfig.closed_book_instruction = "Answer with <answer> a </answer>. '
    '{question}"',
)


@pytest.mark.slow
class HFPolicyRunTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_text_tags_run_and_the_export_loads_in_transformers(self, lora):
    ckpt = fx.save(fx.build("qwen3_tied", vocab_size=320))
    write_tokenizer_dir(ckpt, "qwen3")
    workdir = tempfile.mkdtemp()
    out = launch(workdir, f'experiment.RunConfig.pretrained = "hf:{ckpt}"', *BINDINGS,
                 *(("lora.LoraConfig.rank = 4",) if lora else ()),
                 gin_files=("gin/models/smollm2_135m.gin",
                            *(("gin/models/lora.gin",) if lora else ())))
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    self.assertIn(f"[rl {RL_STEPS}/{RL_STEPS}]", out.stdout)
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    self.assertIn("rl_em", summary)
    exp = workdir_lib.load_experiment(workdir)
    self.assertEqual(exp.env.protocol, "text")                 # "auto" with a pretrained policy
    self.assertEqual(exp.model.config.vocab_size, 320)         # no tag rows added
    # The prompt is the checkpoint's chat template around the configured instruction.
    prompt = exp.tokenizer.decode(exp.encode_prompts(exp.world.splits["test"][:1])[0][0],
                                  skip_special=False)
    self.assertTrue(prompt.startswith("<|im_start|>user\nSearch with <search>"), prompt[:80])
    self.assertIn("<|im_start|>assistant\n", prompt)
    # SFT and RL wrote the steps they were asked for.
    rl = [r for r in metrics_lib.read_metrics(workdir) if "rl/loss" in r]
    self.assertEqual(sorted({r["step"] for r in rl}), list(range(1, RL_STEPS + 1)))

    params = workdir_lib.load_params(exp, workdir, "rl")
    self.assertEqual(exp.config.lora is not None, lora)
    if lora:
      base, adapters = lora_lib.split_params(params)
      self.assertNotEmpty(adapters)
      # The base is the checkpoint's, bit for bit, after SFT and RL; the adapters trained
      # (their B starts at zero).
      self.assertTrue(exp.model.config.scan_layers)          # smollm2_135m.gin's preset
      jax.tree.map(np.testing.assert_array_equal, unstack_layer_params(base),
                   exp.pretrained_params)
      b = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if "lora_b" in str(p)]
      self.assertNotEmpty(b)
      self.assertTrue(all(np.abs(np.asarray(x)).max() > 0 for x in b))
    model, params = exp.export(params)
    export = tempfile.mkdtemp()
    save_hf_checkpoint(model, params, export)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
      shutil.copy(os.path.join(ckpt, name), export)
    with open(os.path.join(export, "config.json")) as f:
      self.assertEqual(json.load(f)["model_type"], "qwen3")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        export, dtype=torch.float32).eval()
    ids = fx.tokens(300, length=12)
    ours = model.apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(ours, fx.torch_logits(torch_model, ids), atol=1e-4, rtol=0)
    # Training moved the weights away from the checkpoint's.
    original = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    self.assertFalse(np.allclose(fx.torch_logits(original.eval(), ids), np.asarray(ours),
                                 atol=1e-3))



if __name__ == "__main__":
  absltest.main()
