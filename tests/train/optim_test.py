import numpy as np
from absl.testing import absltest

from jaxsearch.train.optim import OptimizerConfig, make_optimizer, make_schedule


class ScheduleTest(absltest.TestCase):

  def test_warmup_then_cosine_to_the_end_of_the_phase(self):
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay_steps=-1, end_lr_fraction=0.1)
    sched = make_schedule(cfg, total_steps=110)
    np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(sched(60), 0.55, atol=1e-6)     # half way: (1 + 0.1) / 2
    np.testing.assert_allclose(sched(110), 0.1, atol=1e-6)

  def test_constant_after_warmup(self):
    sched = make_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=4))
    np.testing.assert_allclose([sched(2), sched(4), sched(1000)], [1.0, 2.0, 2.0], atol=1e-6)

  def test_phase_length_required_and_bad_values(self):
    with self.assertRaisesRegex(ValueError, "pass total_steps"):
      make_optimizer(OptimizerConfig(decay_steps=-1))
    with self.assertRaisesRegex(ValueError, "decay_steps must be >= -1, got -2"):
      OptimizerConfig(decay_steps=-2)
    with self.assertRaisesRegex(ValueError, "learning_rate must be > 0, got 0"):
      OptimizerConfig(learning_rate=0)



class PrecisionAndFreezingTest(absltest.TestCase):

  def test_float32_state_for_bf16_params(self):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jaxsearch.train.optim import OptimizerConfig, make_optimizer  # noqa: PLC0415
    params = {"w": jnp.asarray([1.0, -2.0, 3.0], jnp.bfloat16)}
    grads = {"w": jnp.asarray([0.5, 0.25, -1.0], jnp.bfloat16)}
    cfg = OptimizerConfig(learning_rate=0.1, grad_clip=0.0, state_dtype="float32")
    tx = make_optimizer(cfg)
    state = tx.init(params)
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (3,)]
    self.assertLen(moments, 2)                                  # mu and nu
    self.assertTrue(all(m.dtype == jnp.float32 for m in moments))
    updates, state = tx.update(grads, state, params)
    self.assertEqual(updates["w"].dtype, jnp.bfloat16)
    # The same step computed in float32 throughout, then rounded once.
    ref_tx = make_optimizer(OptimizerConfig(learning_rate=0.1, grad_clip=0.0))
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    ref, _ = ref_tx.update(jax.tree.map(lambda x: x.astype(jnp.float32), grads),
                           ref_tx.init(p32), p32)
    np.testing.assert_array_equal(updates["w"], ref["w"].astype(jnp.bfloat16))
    # Without the option the moments follow the parameters (bf16).
    plain = make_optimizer(OptimizerConfig(learning_rate=0.1, grad_clip=0.0)).init(params)
    self.assertTrue(all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(plain)
                        if getattr(x, "shape", ()) == (3,)))
    with self.assertRaisesRegex(ValueError, "state_dtype.*'bfloat16'"):
      OptimizerConfig(state_dtype="bfloat16")

  def test_train_only_freezes_and_holds_no_state_for_the_rest(self):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from jaxsearch.train.optim import train_only  # noqa: PLC0415
    params = {"a": {"kernel": jnp.ones((4, 3)), "kernel_lora_a": jnp.ones((4, 2))},
              "b": {"scale": jnp.ones(5)}}
    tx = train_only(optax.adam(0.1), lambda path: path[-1].endswith("_lora_a"))
    state = tx.init(params)
    sizes = sorted(x.size for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0)
    self.assertEqual(sizes, [8, 8])                              # mu, nu of the adapter only
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["a"]["kernel"], params["a"]["kernel"])
    np.testing.assert_array_equal(new["b"]["scale"], params["b"]["scale"])
    self.assertTrue(np.all(np.asarray(new["a"]["kernel_lora_a"]) < 1.0))


if __name__ == "__main__":
  absltest.main()
