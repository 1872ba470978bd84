"""Shared pieces of the trainer benchmarks: fixed-length preference batches and the trainer's jitted step.

The step is built exactly as `tregjax.training.run` builds it (same loss function, optimizer, shardings, donation,
batch placement), minus the loop's logging and checkpointing.
"""

from __future__ import annotations

import numpy as np
from smollm2_common import REPO  # noqa: F401  (puts the repo on sys.path)


def preference_batch(num_pairs: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0,
                     eos_id: int = 2):
  """Pairs of prompt + response + EOS, all the same length T = prompt_len + response_len + 1 (no padding)."""
  from tregjax.data.batch import PreferenceBatch, SequenceBatch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  t = prompt_len + response_len + 1
  prompts = rng.integers(3, vocab, (num_pairs, prompt_len))

  def side():
    tokens = np.concatenate([prompts, rng.integers(3, vocab, (num_pairs, response_len)),
                             np.full((num_pairs, 1), eos_id)], 1).astype(np.int32)
    labels = np.concatenate([tokens[:, 1:], np.zeros((num_pairs, 1), np.int32)], 1)
    mask = np.zeros((num_pairs, t), np.float32)
    mask[:, prompt_len - 1:t - 1] = 1.0
    return SequenceBatch(tokens=tokens, labels=labels, loss_mask=mask, segment_ids=np.ones_like(tokens),
                         positions=np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape).copy())

  c, r = side(), side()
  f = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return PreferenceBatch(chosen=c, rejected=r, ref_chosen_logps=f(num_pairs) - 50, ref_rejected_logps=f(num_pairs) - 50,
                         ref_chosen_token_logps=f(num_pairs, t) * c.loss_mask,
                         ref_rejected_token_logps=f(num_pairs, t) * r.loss_mask,
                         chosen_token_rewards=0.1 * f(num_pairs, t) * c.loss_mask,
                         rejected_token_rewards=0.1 * f(num_pairs, t) * r.loss_mask)


def trainer_step(config, steps: int = 100):
  """(compiled step, initial state, place): `place(numpy batch)` puts a batch on the mesh as the trainer does."""
  import jax  # pylint: disable=g-import-not-at-top

  from tregjax import parallel  # pylint: disable=g-import-not-at-top
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from tregjax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from tregjax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, check_data=False)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  graphdef, params, extra = trainer.build_model_state(config, mesh, abstract=True)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, steps, params)
  init_fn = lambda p, e: step_lib.init_state(p, e, tx, config.seed)
  state_sh = step_lib.state_shardings(jax.eval_shape(init_fn, params, extra), tx, mesh)
  with parallel.use_mesh(mesh):
    state = jax.jit(lambda: init_fn(*trainer.random_init(config)), out_shardings=state_sh)()
  options = config_lib.objective_options(config) if config.objective == "preference" else None
  loss_fn = step_lib.make_loss_fn(config.objective, options, config.train.logits_chunk_size,
                                  config.data.max_segments if config.data.packing else 1)
  jitted = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, loss_fn, config.optimizer.grad_accum_steps, mesh),
                   in_shardings=(state_sh, None), out_shardings=(state_sh, parallel.sharding_for(None, (), mesh)),
                   donate_argnums=0)
  place = lambda batch: trainer._place(batch, mesh)  # pylint: disable=protected-access
  return jitted, state, place, mesh


def compiled_runner(config, batch):
  """(run, compiled, compile seconds): `run()` does one donated step on `batch` and blocks; it has been run once."""
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  step, state, place, _ = trainer_step(config)
  t0 = time.perf_counter()
  compiled = step.lower(state, place(batch)).compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], place(batch))
    jax.block_until_ready((holder[0], metrics))

  run()  # warm-up
  return run, compiled, compile_s
