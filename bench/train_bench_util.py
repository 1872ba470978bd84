"""Shared pieces of the trainer benchmarks: fixed-length preference batches and the trainer's jitted step.

The step is the trainer's own (`training.trainer.build`: same loss function, optimizer, shardings, donation, batch
placement), minus the loop's hooks (logging, checkpointing, evaluation).
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


def trainer_program(config, steps: int = 100):
  """(`training.trainer.build`'s Program, its initial state): the state is the trainer's init (the reference's
  weights with `model.hf_path`, else a random init)."""
  from tregjax import parallel  # pylint: disable=g-import-not-at-top
  from tregjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from tregjax.training import trainer  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, check_data=False)
  mesh = parallel.mesh_from_config(config)
  program = trainer.build(config, mesh, total_steps=steps)
  with parallel.use_mesh(mesh):
    state = program.init()
  return program, state


def trainer_step(config, steps: int = 100):
  """(jitted step, initial state, place, mesh) of `training.trainer.build`: `place(numpy batch)` puts a batch on the
  mesh as the trainer does."""
  program, state = trainer_program(config, steps)
  return program.train_step, state, program.place, program.mesh


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
