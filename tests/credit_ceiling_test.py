"""The ceiling experiment's dense metric (#28 item 4) against hand-written targets and a torch golden on a tiny
random model, and its analysis (validated settings, the smallest oracle setting beating DPO, share of the ceiling)
against figures computed here by hand."""

import os

import numpy as np
import pytest

from tregjax.tasks import credit_ceiling

TEXT = "First 5 + 4 = 8. Then 8 x 2 = 16 and 16 - 3 = 13. The answer is 13."


def test_result_targets_are_the_true_values_at_each_stated_result():
  # Hand-read: 5 + 4 is 9 (the response wrote 8), 8 x 2 is 16 (right for its own operands), 16 - 3 is 13.
  assert credit_ceiling.result_targets(TEXT) == [(TEXT.index("8."), "9"), (TEXT.index("16 and"), "16"),
                                                 (TEXT.index("13."), "13")]
  # A fractional or negative true value has no integer result to ask for; prose has no target.
  text = "7 / 2 = 3 and 3 - 5 = -2, so 6 x 2 = 12"
  assert credit_ceiling.result_targets(text) == [(text.index("12"), "12")]
  assert credit_ceiling.result_targets("Noah has 21 minutes.") == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random Llama over SmolLM2's vocabulary (torch: the golden; saved and loaded by tregjax) and SmolLM2's
  tokenizer, whose digits are single tokens."""
  import models_golden  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  from tregjax import assets  # pylint: disable=g-import-not-at-top
  tok = AutoTokenizer.from_pretrained(str(assets.tokenizer_dir("smollm2")), local_files_only=True)
  config = dict(models_golden.LLAMA, vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
  hf = models_golden.build_hf(config, seed=3)
  path = models_golden.save_hf(hf, str(tmp_path_factory.mktemp("tiny") / "hf"))
  return hf, path, tok


def _golden(hf, tok, messages, targets_text):
  """exp(Σ log softmax) of the result's digits after the prompt and the prefix, straight from torch's logits."""
  import models_golden  # pylint: disable=g-import-not-at-top
  prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  out = []
  for prefix, value in targets_text:
    ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(prefix + value, add_special_tokens=False)[
        "input_ids"]
    digits = len(value)
    assert [tok.decode([i]) for i in ids[-digits:]] == list(value)  # one token per digit (SmolLM2)
    logits = models_golden.hf_logits(hf, np.array([ids]))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    out.append(float(np.exp(sum(logp[len(ids) - digits - 1 + k, ids[len(ids) - digits + k]] for k in range(digits)))))
  return out


def test_result_probability_matches_torch_on_a_tiny_model(tiny):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from tregjax import models  # pylint: disable=g-import-not-at-top
  hf, path, tok = tiny
  model = models.from_pretrained(path, dtype=jnp.float32)
  q1 = [dict(role="user", content="Ivy has 5 cards and finds 4 more, then doubles them and loses 3. How many?")]
  q2 = [dict(role="user", content="Tom has 7 coins. How many coins does Tom have?")]
  q3 = [dict(role="user", content="Mia has 6 apples and 3 bags of 2. How many?")]
  right = "6 + 3 x 2 = 12, so 12 apples."
  texts = [TEXT, "Tom has 7 coins.", right]
  prompts = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"] for m in (q1, q2, q3)]
  # Hand-written prefixes and correct results (the response's own text up to each result).
  want1 = _golden(hf, tok, q1, [("First 5 + 4 = ", "9"), ("First 5 + 4 = 8. Then 8 x 2 = ", "16"),
                                ("First 5 + 4 = 8. Then 8 x 2 = 16 and 16 - 3 = ", "13")])
  want3 = _golden(hf, tok, q3, [("6 + 3 x 2 = ", "12")])
  scores, counts = credit_ceiling.problem_scores(model, tok, prompts, texts, batch_size=2, bucket=16)
  assert counts.tolist() == [3, 0, 1]
  np.testing.assert_allclose(scores[0], np.mean(want1), rtol=2e-4)
  assert np.isnan(scores[1])
  np.testing.assert_allclose(scores[2], want3[0], rtol=2e-4)
  # The wrong "= 8" needs its own sequence (prefix + "9"); "16" and "13", written right, are read from the response
  # itself; a response with every result right is one sequence.
  rows, n = credit_ceiling.dense_rows(tok, prompts[0], TEXT)
  assert n == 3 and len(rows) == 2 and sorted(len(r.targets) for r in rows) == [1, 2]
  assert len(credit_ceiling.dense_rows(tok, prompts[2], right)[0]) == 1


def test_analysis_picks_settings_on_validation_and_reports_share_on_test():
  rng = np.random.default_rng(0)
  val, test = 40, 60
  dpo = rng.uniform(0.2, 0.4, val + test)
  dpo[3] = np.nan  # a problem whose reference response has no equation
  gains = {"oracle_a1_sum": 0.00, "oracle_a4_sum": 0.10, "confidence_a1_sum": 0.05, "confidence_a4_sum": 0.02}
  per = {"dpo": dpo}
  for name, gain in gains.items():
    per[name] = dpo + gain + rng.normal(0, 0.01, val + test)
  names = {n: (n.split("_")[0], float(n.split("_")[1][1:]), "sum") for n in gains}
  out = credit_ceiling.analyse(per, names, val, seed=0)
  assert out["problems"] == dict(val=39, test=60)
  assert out["validated"] == {"oracle": "oracle_a4_sum", "confidence": "confidence_a1_sum"}
  assert out["smallest_oracle_beating_dpo"] == "oracle_a4_sum"
  d = per["oracle_a4_sum"][40:] - dpo[40:]
  row = out["policies"]["oracle_a4_sum"]["test - dpo"]
  assert row["mean"] == pytest.approx(d.mean())  # Student t at 59 df: the next smaller tabulated quantile, 2.042
  assert row["high"] - row["low"] == pytest.approx(2 * 2.042 * d.std(ddof=1) / np.sqrt(60))
  share = out["share_of_ceiling"]["confidence"]
  want = (per["confidence_a1_sum"][40:].mean() - dpo[40:].mean()) / (per["oracle_a4_sum"][40:].mean()
                                                                      - dpo[40:].mean())
  assert share["share"] == pytest.approx(want) and share["low"] < want < share["high"]
  assert share["setting"] == "confidence_a1_sum"


def test_config_wiring_sweeps_alpha_and_normalisation_of_each_source(tmp_path):
  """configs/credit_ceiling.py: every (source, α, normalisation) is its own arm whose trainer config carries that α
  and normalisation and trains on that source's scored cache; the validation split is inside the held-out problems."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  from conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  from tregjax.experiments import stages  # pylint: disable=g-import-not-at-top
  from tregjax.tasks import arith_experiment  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("ceiling_config", os.path.join(REPO_ROOT, "configs",
                                                                               "credit_ceiling.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  section = credit_ceiling.ceiling_section(config)
  assert max(section.alphas) >= 4 and set(section.normalizations) == {"sum", "mean"}
  assert 0 < section.val_prompts < config.arith.eval_prompts
  names = credit_ceiling.settings(section)
  assert len(names) == 3 * 5 * 2 and names["oracle_a256_mean"] == ("oracle", 256.0, "mean")
  root = str(tmp_path / "W")
  task = arith_experiment.ArithTask(config)
  prepared = stages.Prepared(reference=root + "/reference/hf", tokenizer=root + "/reference/hf",
                             train_pairs=root + "/samples/pairs.jsonl")
  keys = set()
  for name, (source, alpha, norm) in names.items():
    stage = credit_ceiling.arm_stage(config, task, prepared, stages.Stages(root), source, alpha, norm)
    assert (stage.loss.alpha, stage.loss.reg_normalization, stage.loss.regularizer) == (alpha, norm, "treg"), name
    assert stage.data.cache_dir == os.path.join(root, "scored", source, "cache"), name
    keys.add(stages.Stages(root).key_hash(stages.stage_key(stage)))
  assert len(keys) == len(names)  # no two settings share a stage (and so a trained policy)
  for arg, message in (("sources", "must include 'oracle'"), ("alphas", "positive values"),
                       ("normalizations", "'sum' and/or 'mean'")):
    bad = module.get_config()
    bad.ceiling[arg] = {"sources": ("confidence",), "alphas": (0.0,), "normalizations": ("max",)}[arg]
    with pytest.raises(ValueError, match=f"config.ceiling.{arg}: .*{message}"):
      credit_ceiling.ceiling_section(bad)


def test_a_validation_split_that_leaves_no_test_problems_is_refused_before_any_work(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  from conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  from tregjax import errors  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("ceiling_config", os.path.join(REPO_ROOT, "configs",
                                                                               "credit_ceiling.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.ceiling.val_prompts = 8
  with pytest.raises(errors.ConfigError, match=r"config.ceiling.val_prompts=8 leaves no test split of the 8 "
                                               r"held-out problems \(arith.eval_prompts\)"):
    credit_ceiling.run(config, str(tmp_path / "W"))
  assert not (tmp_path / "W").exists()


def test_share_of_the_ceiling_and_its_paired_bootstrap_on_two_problems():
  # Two problems: a draw is (0, 0), (1, 1), or one of each (the problems themselves, in either order). By hand:
  # (0, 0): (0.5 − 0.4) / (0.7 − 0.4) = 1/3; (1, 1): (0.6 − 0.5) / (0.9 − 0.5) = 1/4; both: 0.2 / 0.7 = 2/7, which
  # lies between (a mediant). Each extreme is ~1/4 of 2000 draws, so the 2.5% and 97.5% points are exactly 1/4, 1/3.
  source, oracle, dpo = np.array([0.5, 0.6]), np.array([0.7, 0.9]), np.array([0.4, 0.5])
  s = credit_ceiling.ceiling_share(source, oracle, dpo, seed=0)
  assert s["share"] == pytest.approx(2 / 7)
  assert (s["low"], s["high"]) == (pytest.approx(1 / 4), pytest.approx(1 / 3))
  # The oracle gain over the same draws: 0.3, 0.4 or 0.35 (both); never ≤ 0, so the ratio is stable.
  assert s["oracle_gain"] == dict(mean=pytest.approx(0.35), low=pytest.approx(0.3), high=pytest.approx(0.4))
  assert s["undefined"] == 0 and not s["unstable"]
  # An oracle that loses to DPO on problem 2 (gain −0.05): the (1, 1) draws (~1/4) have no share, so the ratio's
  # interval is unbounded (reported as NaN, flagged); the point figure stands: lift 0.55 − 0.45 = 0.1 over gain
  # 0.525 − 0.45 = 0.075, 4/3.
  s = credit_ceiling.ceiling_share(source, np.array([0.6, 0.45]), dpo, seed=0)
  assert s["share"] == pytest.approx(0.1 / 0.075)
  assert s["unstable"] and 0.15 < s["undefined"] < 0.35 and np.isnan(s["low"]) and np.isnan(s["high"])
  assert s["oracle_gain"]["low"] == pytest.approx(-0.05)
  with pytest.raises(ValueError, match="equal-length 1-d arrays"):
    credit_ceiling.ceiling_share(source, oracle, dpo[:1])


def test_a_mean_setting_weighs_a_response_of_scale_tokens_as_the_sum_setting_does():
  """loss.reg_normalization "mean" divides T-REG's L_REG by each response's length: at α·64 (mean_alpha_scale) it
  equals the sum setting at α on 64-token responses, and twice it on 32-token ones. Golden: numpy by hand."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from tregjax import losses  # pylint: disable=g-import-not-at-top
  section = credit_ceiling.ceiling_section(_config("mini"))
  assert credit_ceiling.trained_alpha(section, 1.0, "mean") == 64.0 and credit_ceiling.trained_alpha(
      section, 4.0, "sum") == 4.0
  rng = np.random.default_rng(1)
  beta, alpha, t = 0.1, 4.0, 64
  logps = -rng.uniform(0.1, 3.0, (2, 2, t))  # [chosen/rejected, pair, token]
  rewards = rng.uniform(-1, 1, (2, 2, t))

  def regularizer(norm, a, lengths):
    mask = np.arange(t)[None, :] < np.array(lengths)[:, None]
    options = losses.ObjectiveOptions(loss="dpo", regularizer="treg", weighting="static", beta=beta, alpha=a,
                                      reg_normalization=norm)
    _, metrics = losses.preference_objective(
        jnp.asarray(logps[0]), jnp.asarray(logps[1]), jnp.asarray(mask), jnp.asarray(mask), options=options,
        ref_chosen_logps=jnp.zeros(2), ref_rejected_logps=jnp.zeros(2), chosen_token_rewards=jnp.asarray(rewards[0]),
        rejected_token_rewards=jnp.asarray(rewards[1]))
    # By hand: α · mean over pairs of Σ_side −β Σ_t r_t log π_t (÷ length under "mean").
    per_side = -beta * np.where(mask[None], rewards * logps, 0.0).sum(-1) / (
        np.array(lengths)[None] if norm == "mean" else 1.0)
    np.testing.assert_allclose(float(metrics["loss/regularizer"]), a * per_side.sum(0).mean(), rtol=1e-5)
    return float(metrics["loss/regularizer"])

  full = regularizer("sum", alpha, [64, 64])
  np.testing.assert_allclose(regularizer("mean", credit_ceiling.trained_alpha(section, alpha, "mean"), [64, 64]),
                             full, rtol=1e-5)
  half = regularizer("sum", alpha, [32, 32])
  np.testing.assert_allclose(regularizer("mean", credit_ceiling.trained_alpha(section, alpha, "mean"), [32, 32]),
                             2 * half, rtol=1e-5)


def test_the_sweep_runs_each_settings_farthest_reach_first_and_mini_trains_both_normalisations(tmp_path):
  section = credit_ceiling.ceiling_section(_config("mini"))
  oracle = credit_ceiling.settings(section, ("oracle",))
  assert oracle == {"oracle_a1_sum": ("oracle", 1.0, "sum"), "oracle_a4_sum": ("oracle", 4.0, "sum"),
                    "oracle_a64_mean": ("oracle", 64.0, "mean"), "oracle_a256_mean": ("oracle", 256.0, "mean")}
  assert credit_ceiling.training_order(oracle) == ["oracle_a4_sum", "oracle_a256_mean", "oracle_a1_sum",
                                                   "oracle_a64_mean"]
  others = credit_ceiling.settings(section, ("confidence", "contrastive"), ("mean",))
  assert credit_ceiling.training_order(others) == ["confidence_a256_mean", "contrastive_a256_mean",
                                                   "confidence_a64_mean", "contrastive_a64_mean"]
  # The first :mini run's arms (oracle at α 1 and 4, sum) keep their names, so their cached stages are this run's.
  assert {"oracle_a1_sum", "oracle_a4_sum"} <= set(oracle)
  bad = _config("mini")
  bad.ceiling.mean_alpha_scale = 0.0
  with pytest.raises(ValueError, match="config.ceiling.mean_alpha_scale: a positive number required, got 0.0"):
    credit_ceiling.ceiling_section(bad)


def _config(arg=None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  from conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("ceiling_config", os.path.join(REPO_ROOT, "configs",
                                                                               "credit_ceiling.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_an_arm_finished_at_the_trainers_micro_batching_is_reused_and_another_alpha_is_refused(tmp_path, monkeypatch):
  """ceiling.arm_grad_accum_steps changes memory, not the update: :mini's swept arms run at 8 micro-batches, and its
  arms finished earlier at the trainer's 2 are reused (not retrained); a finished arm of another α is still refused."""
  from tregjax import errors  # pylint: disable=g-import-not-at-top
  from tregjax.experiments import stages  # pylint: disable=g-import-not-at-top
  from tregjax.tasks import arith_experiment  # pylint: disable=g-import-not-at-top
  config = _config("mini")
  assert (config.optimizer.grad_accum_steps, config.ceiling.arm_grad_accum_steps) == (2, 8)
  root = str(tmp_path / "W")
  task = arith_experiment.ArithTask(config)
  prepared = stages.Prepared(reference=root + "/reference/hf", tokenizer=root + "/reference/hf",
                             train_pairs=root + "/samples/pairs.jsonl")
  work = stages.Stages(root)
  swept = credit_ceiling.arm_stage(config, task, prepared, work, "oracle", 4.0, "sum", 8)
  earlier = credit_ceiling.arm_stage(config, task, prepared, work, "oracle", 4.0, "sum")
  assert (swept.optimizer.grad_accum_steps, earlier.optimizer.grad_accum_steps) == (8, 2)
  work.finish("arms/oracle_a4_sum", 0.0, key=stages.stage_key(earlier))
  monkeypatch.setattr(credit_ceiling.trainer, "run", lambda *a, **k: pytest.fail("a finished arm was retrained"))
  assert credit_ceiling.train(config, task, prepared, work, "oracle_a4_sum", swept, "oracle") == os.path.join(
      root, "arms", "oracle_a4_sum", "hf")
  other = credit_ceiling.arm_stage(config, task, prepared, work, "oracle", 1.0, "sum", 8)
  with pytest.raises(errors.StaleCacheError, match="loss.alpha: 4.0 -> 1.0"):
    credit_ceiling.train(config, task, prepared, work, "oracle_a4_sum", other, "oracle")
