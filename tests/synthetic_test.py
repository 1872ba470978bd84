"""The synthetic demo world: its oracle, data generators and metrics against naive re-derivations."""


import numpy as np

from tregjax.synthetic import world as w


def test_correct_response_has_no_errors_and_corruption_is_detected():
  world = w.World()
  rng = np.random.default_rng(0)
  for task in w.TASKS:
    for start in range(world.num_symbols):
      good = world.correct_response(task, start)
      assert not world.token_errors(task, start, good).any()
      bad = good.copy()
      bad[3] = (bad[3] + 1) % world.num_symbols
      errors = world.token_errors(task, start, bad)
      # Position 3 is wrong; position 4 follows the table from the original token 3, so it is wrong too after the edit
      # unless the table happens to map the new token there.
      assert errors[3] and not errors[:3].any()
  rates = [world.token_errors("walk", 5, world.corrupt("walk", 5, 0.3, rng)).mean() for _ in range(2000)]
  assert abs(np.mean(rates) - 0.3) < 0.02


def test_preference_pairs_prefer_fewer_errors():
  world = w.World()
  for r in w.preference_records(world, 50, 0.4, seed=1):
    task, start = r["prompt"].split()
    start = int(start)
    count = lambda text: int(world.token_errors(task, start, np.array(text.split(), int)).sum())
    assert count(r["chosen"]) == r["chosen_errors"] < r["rejected_errors"] == count(r["rejected"])


def test_tokenizer_keeps_response_ids_across_contrastive_prompts(tmp_path):
  from tregjax.data.tokenize import ChatTokenizer, with_instruction
  world = w.World()
  tok = ChatTokenizer(w.write_tokenizer(world, str(tmp_path / "tok")))
  vocab = tok.tokenizer.get_vocab()
  response = world.correct_response("jump", 7)
  ids = tok.response_ids(w.response_text(response))
  assert ids == [vocab[str(t)] for t in response] + [vocab[w.EOS]]
  plain = tok.prompt_ids([{"role": "user", "content": "jump 7"}])
  better = tok.prompt_ids(with_instruction([{"role": "user", "content": "jump 7"}], w.CAREFUL, "system"))
  assert plain == [vocab[w.USER], vocab["jump"], vocab["7"], vocab[w.ASSISTANT]]
  assert better == [vocab[w.SYSTEM], vocab[w.CAREFUL]] + plain
