"""Two processes x 4 CPU devices train exactly like one process x 8 (issue 5, acceptance 2).

`TwoProcessTest` launches this file as a worker three times: two processes on localhost that
join with `distributed.initialize` (gloo CPU collectives), 4 fake devices each, and one
reference process with 8 fake devices. Every worker builds the quickstart agent
(`experiment.setup` with the quickstart model of gin/models/tiny.gin and the GRPO settings of
gin/algos/grpo.gin, 64 rows per step), then for two meshes spanning all 8 devices

  - (data=8): pure data parallel, each process feeds the 32 rows its devices hold;
  - (data=1, fsdp=4, tensor=2): parameters and optimizer state split ACROSS the processes
    (each embed dimension half on process 0, half on process 1), the batch over fsdp;

runs 3 GRPO policy updates (`steps.make_policy_update_fn`, `sharding.jit_sharded`, state
donated) on 3 deterministic batches, each process loading only `process_rows` of each and
assembling the global batch with `distributed.global_batch`. Process 0 alone writes the
losses and the parameters (`distributed.on_primary`, gathered with the collective
`distributed.to_host`); all processes save an orbax checkpoint together (collective).
Checks: same losses and parameters as the one-process run within 1e-5, the parameters moved,
only process 0 wrote, each process read its half of the rows, and the two-process checkpoint
restores here to the same parameters.

Optimizer: SGD with momentum (linear in the gradient: a 1e-5 tolerance on parameters checks
the gradient; Adam's first step ~ lr * sign(g) would amplify float noise in near-zero
gradients, as in sharded_updates_test.py).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from tests.xla_env import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESHES = {"data8": (8, 1, 1), "fsdp4_tensor2": (1, 4, 2)}
STEPS = 3
SEED = 0


# ---------------------------------------------------------------------------------------------
# The worker (runs in a subprocess: `python distributed_test.py --worker '{json}'`).


def _quickstart_configs():
  """The quickstart's policy and GRPO settings (gin/models/tiny.gin, gin/algos/grpo.gin)."""
  from jaxsearch.models.transformer import TransformerConfig  # noqa: PLC0415
  from jaxsearch.programs.search_agent.experiment import RunConfig  # noqa: PLC0415
  from jaxsearch.train.steps import PolicyGradientConfig  # noqa: PLC0415
  model = TransformerConfig(vocab_size=1024, d_model=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, mlp_dim=384, max_len=256)
  grpo = PolicyGradientConfig(prompts_per_step=8, num_generations=8, clip_eps=0.2, kl_coef=0.01,
                    kl_kind="low_var_kl", advantage_options={"scale": "group"}, updates_per_batch=1)
  return RunConfig(seed=SEED, tokenizer_vocab_size=1024, model=model), grpo


def _global_batch_numpy(exp, grpo, step: int):
  """A deterministic GRPO batch of B x G rows: real question prompts + random completions."""
  from jaxsearch import losses  # noqa: PLC0415
  rng = np.random.default_rng(1000 + step)
  b, g = grpo.prompts_per_step, grpo.num_generations
  questions = exp.world.splits["train"][step * b:(step + 1) * b]
  prompts, lens = exp.encode_prompts(questions)
  width, completion = exp.prompt_width, 16
  vocab = exp.model.config.vocab_size
  tokens = np.full((b * g, width + completion), exp.tokenizer.pad_id, np.int32)
  tokens[:, :width] = np.repeat(prompts, g, axis=0)
  tokens[:, width:] = rng.integers(4, vocab, (b * g, completion))
  lengths = rng.integers(4, completion + 1, b * g)
  policy_mask = ((np.arange(width + completion)[None] >= width)
                 & (np.arange(width + completion)[None] < width + lengths[:, None]))
  rewards = rng.integers(0, 2, b * g).astype(np.float32) + 0.1 * rng.random(b * g)
  advantages = np.asarray(losses.grpo_advantages(
      rewards.astype(np.float32), np.repeat(np.arange(b), g), scale=grpo.advantage_options["scale"]))
  ref_logp = np.log(rng.uniform(0.05, 0.5, tokens.shape)).astype(np.float32)
  return tokens, policy_mask, advantages.astype(np.float32), ref_logp


def _flat(tree) -> dict[str, np.ndarray]:
  import jax  # noqa: PLC0415
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def worker(args: dict) -> None:
  """One process of the run (see the module docstring); writes result_<pid>.npz on process 0."""
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from flax import linen as nn  # noqa: PLC0415

  from jaxsearch.checkpoint import Checkpointer  # noqa: PLC0415
  from jaxsearch.train import distributed, sharding  # noqa: PLC0415
  from jaxsearch.programs.search_agent.experiment import setup  # noqa: PLC0415
  from jaxsearch.train.steps import PolicyGradientBatch, make_policy_update_fn  # noqa: PLC0415

  started = distributed.initialize(args["coordinator"], args["num_processes"],
                                   args["process_id"])
  assert started == (args["num_processes"] > 1), started
  assert jax.process_count() == args["num_processes"], jax.process_count()
  assert jax.device_count() == 8 and jax.local_device_count() == 8 // args["num_processes"]
  config, grpo = _quickstart_configs()
  exp = setup(config)
  tx = optax.sgd(0.5, momentum=0.9)
  update_fn = make_policy_update_fn(exp.apply_fn, grpo)
  params0, specs = exp.init_params(jax.random.fold_in(jax.random.key(SEED), 0))
  result: dict[str, np.ndarray] = {}
  for name, (data, fsdp, tensor) in MESHES.items():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      state, state_sh = sharding.sharded_train_state(params0, specs, apply_fn=exp.apply_fn,
                                                     tx=tx, mesh=mesh)
      update = sharding.jit_sharded(update_fn, (state_sh, sharding.batch_sharding(mesh)),
                                    sharding.state_and_metrics_shardings(state_sh, mesh),
                                    donate_argnums=0)
      losses = []
      for step in range(STEPS):
        tokens, mask, adv, ref_logp = _global_batch_numpy(exp, grpo, step)
        rows = distributed.process_rows(len(tokens), mesh)
        local = PolicyGradientBatch(tokens[rows], mask[rows], adv[rows], None, ref_logp[rows])
        batch = distributed.global_batch(local, mesh, len(tokens))
        state, metrics = update(state, batch)
        losses.append(float(distributed.to_host(metrics["loss"])))
      params = distributed.to_host(state.params)          # collective: every process
      if name == "fsdp4_tensor2":
        ckpt = Checkpointer(os.path.join(args["out"], "ckpt"))
        ckpt.save(STEPS, {"params": state.params}, {"processes": jax.process_count()})
        ckpt.close()
    result[f"{name}/losses"] = np.asarray(losses)
    result[f"{name}/rows"] = np.asarray(
        [[distributed.process_rows(64, mesh, p).start, distributed.process_rows(64, mesh, p).stop]
         for p in range(jax.process_count())])
    result.update({f"{name}/params/{k}": v for k, v in _flat(params).items()})
  result.update({f"init/params/{k}": v for k, v in _flat(jax.device_get(params0)).items()})
  path = os.path.join(args["out"], f"result_{jax.process_index()}.npz")
  distributed.on_primary(np.savez, path, **result)


# ---------------------------------------------------------------------------------------------
# The tests.

if __name__ != "__main__" or "--worker" not in sys.argv:
  import jax
  import pytest
  from absl.testing import absltest

  from jaxsearch.train import distributed, sharding

  def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]

  def _launch(out: str, num_processes: int, process_id: int, port: int):
    env = subprocess_env(8 // num_processes,
                         PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
      env.pop(name, None)
    args = dict(out=out, coordinator=f"127.0.0.1:{port}", num_processes=num_processes,
                process_id=process_id)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                             json.dumps(args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

  @pytest.mark.slow
  class TwoProcessTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
      super().setUpClass()
      cls.multi_dir, cls.single_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
      port = _free_port()
      t0 = time.time()
      procs = {"process 0 of 2": _launch(cls.multi_dir, 2, 0, port),
               "process 1 of 2": _launch(cls.multi_dir, 2, 1, port),
               "single process": _launch(cls.single_dir, 1, 0, port)}
      cls.logs, cls.codes = {}, {}
      for name, proc in procs.items():
        try:
          out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
          proc.kill()
          out, err = proc.communicate()
        cls.logs[name], cls.codes[name] = (out + err)[-6000:], proc.returncode
      cls.seconds = time.time() - t0

    def setUp(self):
      super().setUp()
      if any(self.codes.values()):
        report = "\n".join(f"===== {name}: exit {self.codes[name]}\n{log}"
                           for name, log in self.logs.items())
        self.fail(f"a worker failed:\n{report}")
      self.multi = dict(np.load(os.path.join(self.multi_dir, "result_0.npz")))
      self.single = dict(np.load(os.path.join(self.single_dir, "result_0.npz")))

    def _params(self, result, mesh):
      prefix = f"{mesh}/params/"
      return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}

    def test_only_process_0_wrote_its_result(self):
      self.assertEqual(sorted(f for f in os.listdir(self.multi_dir) if f.endswith(".npz")),
                       ["result_0.npz"])

    def test_each_process_loaded_its_half_of_the_rows(self):
      for mesh in MESHES:
        np.testing.assert_array_equal(self.multi[f"{mesh}/rows"], [[0, 32], [32, 64]])
        np.testing.assert_array_equal(self.single[f"{mesh}/rows"], [[0, 64]])

    def test_same_losses_and_parameters_as_one_process(self):
      init = self._params(self.multi, "init")
      np.testing.assert_array_equal(self.multi["init/params/embed/embedding"],
                                    self.single["init/params/embed/embedding"])
      for mesh in MESHES:
        np.testing.assert_allclose(self.multi[f"{mesh}/losses"], self.single[f"{mesh}/losses"],
                                   atol=1e-5, rtol=0, err_msg=mesh)
        multi, single = self._params(self.multi, mesh), self._params(self.single, mesh)
        self.assertEqual(sorted(multi), sorted(single))
        self.assertEqual(sorted(multi), sorted(init))
        moved = 0.0
        for key in multi:
          np.testing.assert_allclose(multi[key], single[key], atol=1e-5, rtol=0,
                                     err_msg=f"{mesh} {key}")
          moved = max(moved, float(np.abs(multi[key] - init[key]).max()))
        self.assertGreater(moved, 1e-3, mesh)        # the 3 updates changed the parameters
      # The two meshes are the same computation: their results agree too.
      np.testing.assert_allclose(self.multi["data8/losses"], self.multi["fsdp4_tensor2/losses"],
                                 atol=1e-5, rtol=0)

    def test_two_process_checkpoint_restores_in_one_process(self):
      from jaxsearch.checkpoint import Checkpointer  # noqa: PLC0415
      expected = self._params(self.single, "fsdp4_tensor2")
      ckpt = Checkpointer(os.path.join(self.multi_dir, "ckpt"))
      self.assertEqual(ckpt.latest_step(), STEPS)
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = {"params": _unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device)
                                      for k, v in expected.items()})}
      tree, meta = ckpt.restore(STEPS, target)
      ckpt.close()
      self.assertEqual(meta, {"processes": 2})
      restored = {k: np.asarray(v) for k, v in _flat_dict(tree["params"]).items()}
      self.assertEqual(sorted(restored), sorted(expected))
      for key, value in expected.items():
        np.testing.assert_allclose(restored[key], value, atol=1e-5, rtol=0, err_msg=key)

  def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
      node = out
      *parents, leaf = key.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
    return out

  def _flat_dict(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
      if isinstance(v, dict):
        out.update(_flat_dict(v, f"{prefix}{k}/"))
      else:
        out[f"{prefix}{k}"] = v
    return out

  class SingleProcessTest(absltest.TestCase):
    """The helpers in one process (8 fake devices): argument checks and the trivial cases."""

    def test_one_process_or_nothing_set_is_a_no_op(self):
      self.assertFalse(distributed.initialize(environ={}))
      self.assertFalse(distributed.initialize(environ={distributed.ENV_NUM_PROCESSES: "1"}))
      self.assertFalse(distributed.initialize(num_processes=1, environ={}))
      self.assertEqual(jax.process_count(), 1)

    def test_bad_settings_name_the_value(self):
      cases = [
          (dict(environ={distributed.ENV_NUM_PROCESSES: "two"}), "JAXSEARCH_NUM_PROCESSES='two'"),
          (dict(num_processes=2, environ={}), "needs a coordinator address"),
          (dict(coordinator_address="127.0.0.1:1234", environ={}), "num_processes is not"),
          (dict(coordinator_address="localhost", num_processes=2, process_id=0, environ={}),
           "must be 'host:port', got 'localhost'"),
          (dict(coordinator_address="127.0.0.1:1234", num_processes=2, environ={}),
           "needs this process's id"),
          (dict(environ={distributed.ENV_COORDINATOR: "127.0.0.1:1234",
                         distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "2"}),
           r"process_id must be in \[0, 2\), got 2"),
          (dict(num_processes=0, environ={}), "num_processes must be >= 1, got 0"),
          (dict(local_device_ids="0,x", num_processes=1, environ={}),
           "comma-separated integers, got '0,x'"),
      ]
      for kwargs, message in cases:
        with self.assertRaisesRegex(ValueError, message, msg=str(kwargs)):
          distributed.initialize(**kwargs)

    def test_process_rows_follow_the_batch_sharding(self):
      mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
      self.assertEqual(distributed.process_rows(16, mesh), slice(0, 16))
      self.assertEqual(distributed.process_rows(16), slice(0, 16))
      with self.assertRaisesRegex(ValueError, "has 6 rows.*multiple of 4"):
        distributed.process_rows(6, mesh)
      with self.assertRaisesRegex(ValueError, "process 1 has no device"):
        distributed.process_rows(16, mesh, process_index=1)

    def test_global_batch_is_shard_batch_in_one_process(self):
      mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
      tree = {"tokens": np.arange(48, dtype=np.int32).reshape(16, 3),
              "adv": np.linspace(-1, 1, 16, dtype=np.float32), "none": None}
      out = distributed.global_batch(tree, mesh, 16)
      self.assertIsNone(out["none"])
      for key in ("tokens", "adv"):
        np.testing.assert_array_equal(np.asarray(out[key]), tree[key])
        self.assertTrue(out[key].sharding.is_equivalent_to(sharding.batch_sharding(mesh),
                                                           tree[key].ndim))
        self.assertEqual(len(out[key].addressable_shards), 8)
        self.assertEqual(out[key].addressable_shards[0].data.shape[0], 2)
      with self.assertRaisesRegex(ValueError, "holds 16 rows but its share of a 32-row"):
        distributed.global_batch(tree, mesh, 32)
      host = distributed.to_host(out)
      self.assertIsInstance(host["tokens"], np.ndarray)
      np.testing.assert_array_equal(host["tokens"], tree["tokens"])

    def test_on_primary_runs_on_process_0(self):
      calls = []
      self.assertTrue(distributed.is_primary())
      self.assertEqual(distributed.on_primary(lambda x: calls.append(x) or x + 1, 41), 42)
      self.assertEqual(calls, [41])


if __name__ == "__main__":
  if "--worker" in sys.argv:
    sys.path.insert(0, REPO)
    worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
  else:
    absltest.main()
