"""The runner's own rules, without models: config checks, stage keys, token strings for the heatmap."""

import os
import types

import ml_collections
import numpy as np
import pytest
from transformers import AutoTokenizer

from tregjax import errors
from tregjax.experiments import runner
from tregjax.experiments import stages as stages_lib


def _config(**experiment):
  defaults = stages_lib.default_experiment_config().to_dict()
  return ml_collections.ConfigDict(dict(experiment=dict(defaults, **experiment)))


def test_experiment_section_names_the_bad_key_or_arm():
  with pytest.raises(ValueError, match=r"unknown key config.experiment.armz \(did you mean config.experiment.arms\?\)"):
    runner.experiment_section(_config(armz=("dpo",)))
  with pytest.raises(ValueError, match=r"experiment.arms: unknown \['dpo_regg'\]"):
    runner.experiment_section(_config(arms=("dpo", "dpo_regg")))
  with pytest.raises(ValueError, match="experiment.credit_policies"):
    runner.experiment_section(_config(arms=("dpo",), credit_policies=("dpo_reg",)))
  with pytest.raises(ValueError, match="add 'dpo'"):
    runner.experiment_section(_config(arms=("tgdpo",), credit_policies=()))
  assert runner.experiment_section(_config(arms=("dpo", "tgdpo"))).arms == ("dpo", "tgdpo")


def test_stage_keys_survive_a_moved_workdir_and_refuse_other_inputs(tmp_path):
  first = stages_lib.Stages(str(tmp_path / "a"))
  key = {"data": {"cache_dir": os.path.join(first.root, "scored", "cache")}, "loss": {"alpha": 0.25}}
  first.finish("arms/dpo", started=0.0, key=key)
  os.rename(tmp_path / "a", tmp_path / "b")
  moved = stages_lib.Stages(str(tmp_path / "b"))
  assert moved.done("arms/dpo", {"data": {"cache_dir": os.path.join(moved.root, "scored", "cache")},
                                 "loss": {"alpha": 0.25}})
  with pytest.raises(errors.StaleCacheError, match="made from other inputs"):
    moved.done("arms/dpo", {"data": {"cache_dir": os.path.join(moved.root, "scored", "cache")}, "loss": {"alpha": 0.5}})
  assert not moved.done("arms/dpo_reg", key)


def test_a_config_key_added_since_at_its_default_keeps_the_stage_and_a_changed_one_is_named(tmp_path):
  stages = stages_lib.Stages(str(tmp_path))
  stages.finish("arms/dpo", started=0.0, key={"loss": {"alpha": 0.25, "beta": 0.1}})
  # loss.tis_mu did not exist when the stage was made; at its default (1.0) the stage was made with that value.
  assert stages.done("arms/dpo", {"loss": {"alpha": 0.25, "beta": 0.1, "tis_mu": 1.0}})
  with pytest.raises(errors.StaleCacheError, match=r"loss.tis_mu: '\(absent\)' -> 2.0"):
    stages.done("arms/dpo", {"loss": {"alpha": 0.25, "beta": 0.1, "tis_mu": 2.0}})
  with pytest.raises(errors.StaleCacheError, match=r"loss.alpha: 0.25 -> 0.5"):
    stages.done("arms/dpo", {"loss": {"alpha": 0.5, "beta": 0.1}})
  with pytest.raises(errors.StaleCacheError, match=r"loss.beta: 0.1 -> '\(absent\)'"):
    stages.done("arms/dpo", {"loss": {"alpha": 0.25}})
  # A stage key that nests the trainer's config (the demo's SFT reference) gets the same rule.
  stages.finish("reference", started=0.0, key={"trainer": {"loss": {"alpha": 0.25}}, "steps": 30})
  assert stages.done("reference", {"trainer": {"loss": {"alpha": 0.25, "tis_mu": 1.0}}, "steps": 30})
  with pytest.raises(errors.StaleCacheError, match=r"trainer.loss.tis_mu"):
    stages.done("reference", {"trainer": {"loss": {"alpha": 0.25, "tis_mu": 3.0}}, "steps": 30})


def test_token_strings_join_to_the_decoded_response():
  from tregjax import assets
  tok = AutoTokenizer.from_pretrained(assets.fetch("smollm2").parent / "tokenizer")
  text = "29 + 14 = 31.\nThe answer is 31."
  ids = tok(text, add_special_tokens=False)["input_ids"]
  pieces = runner.token_strings(tok, ids)
  assert len(pieces) == len(ids) and "".join(pieces) == text
  assert pieces[ids.index(tok.convert_tokens_to_ids("Ġanswer"))] == " answer"


def test_a_preempted_stage_stops_the_experiment_instead_of_being_marked_done(tmp_path):
  stages = stages_lib.Stages(str(tmp_path))
  with pytest.raises(SystemExit) as stop:
    runner.exit_if_preempted(types.SimpleNamespace(stopped="preempted", step=7), stages, "arms/dpo")
  assert stop.value.code == 0 and not stages.done("arms/dpo")
  runner.exit_if_preempted(types.SimpleNamespace(stopped="completed", step=12), stages, "arms/dpo")  # no exit


def test_tisdpo_weights_of_responses_of_different_lengths_equal_numpy_per_response():
  rng = np.random.default_rng(0)
  rows = [{"chosen_token_rewards": rng.uniform(-0.5, 0.5, n), "rejected_token_rewards": rng.uniform(-0.5, 0.5, m)}
          for n, m in ((3, 7), (5, 1))]
  got = runner.tisdpo_weights(rows)
  want = []
  for row in rows:
    for side in ("chosen", "rejected"):
      p = row[f"{side}_token_rewards"] + 0.5
      w = np.exp(np.clip(np.log(p / (1 - p)), -0.5, 1.5))
      want.append(w / w.mean())
  np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5)

