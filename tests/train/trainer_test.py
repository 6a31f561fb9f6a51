"""The trainer skeleton: cadence of logs, evaluations and checkpoints, resume, epoch batches."""
import os
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxsearch.checkpoint import Checkpointer
from jaxsearch.train import trainer


class FakeWriter:

  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append((step, dict(scalars)))

  def flush(self):
    pass


def counting_step(state, step):
  """State = number of steps taken; the metric is the step index."""
  return state + 1, {"loss": float(step), "index/refreshes": 7.0}, trainer.StepWork(10.0, 20.0)


class RunLoopTest(absltest.TestCase):

  def run_loop(self, loop, start=0, state=0, **kwargs):
    writer, saved, evals, calls = FakeWriter(), [], [], []
    final = trainer.run_loop(
        loop, state, counting_step, start=start, writer=writer,
        save_fn=lambda step, s: saved.append((step, s)),
        eval_fn=lambda s, step: (evals.append(step), {"em": step / 10})[1],
        after_first_step=trainer.once(lambda: calls.append(1)), **kwargs)
    return final, writer, saved, evals, calls

  def test_cadence(self):
    loop = trainer.LoopConfig(name="sft", steps=10, log_every=4, checkpoint_every=3,
                              eval_every=5)
    final, writer, saved, evals, calls = self.run_loop(loop, peak_flops=1e12)
    self.assertEqual(final, 10)
    logged = [(step, row) for step, row in writer.rows if "sft/loss" in row]
    self.assertEqual([s for s, _ in logged], [4, 8, 10])                  # + the last step
    self.assertEqual([row["sft/loss"] for _, row in logged], [3.0, 7.0, 9.0])
    for _, row in logged:
      self.assertIn("index/refreshes", row)       # a key with its own group keeps it
      self.assertNotIn("sft/index/refreshes", row)
      self.assertGreater(row["sft/tokens_per_s"], 0)
      self.assertIn("sft/mfu", row)
    self.assertEqual(saved, [(3, 3), (6, 6), (9, 9), (10, 10)])
    self.assertEqual(evals, [5, 10])
    self.assertIn((10, {"validation/em": 1.0}), writer.rows)
    self.assertEqual(calls, [1])

  def test_options_and_resume(self):
    loop = trainer.LoopConfig(name="dense", steps=6, log_every=4, checkpoint_every=4,
                              eval_every=3, eval_prefix="valid", eval_at_end=False,
                              log_first_step=True)
    final, writer, saved, evals, calls = self.run_loop(loop, start=2, state=2)
    self.assertEqual(final, 6)
    logged = [step for step, row in writer.rows if "dense/loss" in row]
    self.assertEqual(logged, [4, 6])            # resumed at 2: step 1 is not this run's
    self.assertEqual(evals, [3])                 # not at the last step
    self.assertIn((3, {"valid/em": 0.3}), writer.rows)
    self.assertEqual(saved, [(4, 4), (6, 6)])
    _, writer, _, _, _ = self.run_loop(loop)
    self.assertEqual([step for step, row in writer.rows if "dense/loss" in row], [1, 4, 6])

  def test_nothing_to_do_after_the_last_step(self):
    loop = trainer.LoopConfig(name="rm", steps=3, checkpoint_every=1)
    final, writer, saved, evals, calls = self.run_loop(loop, start=3, state=3)
    self.assertEqual((final, writer.rows, saved, calls), (3, [], [], []))

  def test_bad_cadence_is_named(self):
    with self.assertRaisesRegex(ValueError, "LoopConfig.log_every of 'x' must be >= 1, got 0"):
      trainer.LoopConfig(name="x", steps=3, log_every=0)


class RestoreTest(absltest.TestCase):

  def test_restore_latest_and_fresh_start(self):
    directory = tempfile.mkdtemp()
    ckpt = Checkpointer(os.path.join(directory, "ckpt"))
    fresh = {"w": jnp.zeros(3)}

    class Box:  # a state with `replace`, like TrainState
      def __init__(self, tree):
        self.tree = tree

      def replace(self, **tree):
        return Box(tree)

    state, start, meta = trainer.restore_latest(ckpt, Box(fresh), lambda b: b.tree)
    self.assertEqual((start, meta), (0, {}))
    ckpt.save(4, {"w": jnp.arange(3.0)}, {"phase": "test"})
    state, start, meta = trainer.restore_latest(ckpt, Box(fresh), lambda b: b.tree)
    self.assertEqual((start, meta["phase"]), (4, "test"))
    np.testing.assert_array_equal(state.tree["w"], [0.0, 1.0, 2.0])
    ckpt.close()


class EpochBatchTest(absltest.TestCase):

  def test_epochs_are_seeded_permutations(self):
    n, bs = 10, 4
    batches = [trainer.epoch_batch((0, 1), step, bs, n) for step in range(5)]
    order0 = np.random.default_rng([0, 1, 0]).permutation(n)
    np.testing.assert_array_equal(np.concatenate(batches[:2]), order0[:8])
    # The third batch runs past the epoch's end and wraps to the epoch's first indices.
    np.testing.assert_array_equal(batches[2], np.take(order0, [8, 9, 10, 11], mode="wrap"))
    order1 = np.random.default_rng([0, 1, 1]).permutation(n)
    np.testing.assert_array_equal(batches[3], order1[2:6])   # step 3 starts at 12 = 10 + 2
    np.testing.assert_array_equal(trainer.epoch_batch(0, 3, bs, n),
                                  trainer.epoch_batch((0,), 3, bs, n))

  def test_once(self):
    calls = []
    f = trainer.once(lambda: calls.append(1))
    f(), f()
    self.assertEqual(calls, [1])
    trainer.once(None)()   # a no-op


class MemoryCheckTest(absltest.TestCase):

  def test_a_step_that_does_not_fit_names_the_settings(self):
    # A jitted step whose temporaries hold the [1024, 1024] float32 product x^T x (4 MiB).
    step = jax.jit(lambda x: jnp.sum((x.T @ x) @ x.T))
    x = jax.ShapeDtypeStruct((4, 1024), jnp.float32)
    writer = FakeWriter()
    report = trainer.compile_report("toy", step, writer, x)
    self.assertGreater(report["temp_bytes"], 1 << 20)
    self.assertEqual(writer.rows[0][1]["compile/toy_total_bytes"], report["total_bytes"])
    settings = {"experiment.SFTConfig.micro_batch_size": 0,
                "transformer.TransformerConfig.logits_chunk": 0}
    trainer.check_fits("toy", report, settings, limit=report["total_bytes"])   # just fits
    with self.assertRaisesRegex(
        trainer.StepDoesNotFit,
        r"the toy step needs [\d.]+ MiB per device \(arguments 0.0 MiB, temporaries [\d.]+ "
        r"MiB\) but a device has [\d.]+ MiB; no toy step has run. Lower its memory with one "
        r"of: experiment.SFTConfig.micro_batch_size \(now 0\); "
        r"transformer.TransformerConfig.logits_chunk \(now 0\)"):
      trainer.check_fits("toy", report, settings, limit=report["total_bytes"] - 1)
    with mock.patch.dict(os.environ, {trainer.ENV_DEVICE_MEMORY: "1000"}):
      self.assertEqual(trainer.device_memory_bytes(), 1000.0)
      with self.assertRaises(trainer.StepDoesNotFit):
        trainer.compile_report("toy", step, writer, x, settings=settings)
    with mock.patch.dict(os.environ, {trainer.ENV_DEVICE_MEMORY: ""}):
      self.assertGreater(trainer.device_memory_bytes(), 1 << 20)   # this host's memory


if __name__ == "__main__":
  absltest.main()
