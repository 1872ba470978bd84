"""The harder arithmetic level of #28 (level 4: four operations), checked with Python's own evaluator."""

import ast
import fractions

import pytest

from tregjax.tasks import arith


def _evaluate(node) -> tuple[fractions.Fraction, int]:
  """(exact value, number of binary operations) of a parsed expression, independently of the task's parser."""
  if isinstance(node, ast.Expression):
    return _evaluate(node.body)
  if isinstance(node, ast.Constant):
    return fractions.Fraction(node.value), 0
  assert isinstance(node, ast.BinOp), ast.dump(node)
  (a, n), (b, m) = _evaluate(node.left), _evaluate(node.right)
  ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b}
  return ops[type(node.op)](), n + m + 1


def test_level_four_has_four_exact_operations_and_the_stated_answer():
  problems = arith.make_problems(60, seed=5, levels=(4,), max_operand=40)
  assert len({p.question for p in problems}) == 60
  for p in problems:
    value, ops = _evaluate(ast.parse(p.expression, mode="eval"))
    assert (p.level, ops, value) == (4, 4, p.answer), p
    assert 1 <= p.answer <= 999
    # The oracle grades a response that writes the computation out: right and wrong results.
    assert arith.sequence_reward(f"So {p.expression} = {p.answer}. The answer is {p.answer}.", p.answer) == (1.0, True)
    assert arith.sequence_reward(f"The answer is {p.answer + 1}.", p.answer) == (0.0, True)


def test_mixed_levels_cycle_and_level_five_is_refused():
  assert [p.level for p in arith.make_problems(8, seed=2, levels=(1, 4))] == [1, 4] * 4
  with pytest.raises(ValueError, match=r"levels must be a non-empty subset of \(1, 2, 3, 4\), got \(5,\)"):
    arith.make_problems(3, seed=1, levels=(5,))


# A response cut by the token budget (#28): Qwen2.5-Coder-0.5B ran out of its 128 tokens in 43 of 48 samples, and
# the oracle graded the last number it had reached (an intermediate one, or one copied from the question) as a wrong
# final answer. Hand-labelled character marks: + correct, - wrong, blank unlabelled.
CUT_CASES = [
    # (text, answer, finished, marks)
    ("First 21 + 6 = 27. Then 27 / 9 = 4. Noah has 21", 3, True,
     "               ++                -           --"),   # finished: 21 is its (wrong) final answer
    ("First 21 + 6 = 27. Then 27 / 9 = 4. Noah has 21", 3, False,
     "               ++                -             "),   # cut: no final answer; its equations still count
    ("First 21 + 6 = 27. Then 27 / 9 = 3. Next 3 x 4 = 1", 3, True,
     "               ++                +               -"),
    ("First 21 + 6 = 27. Then 27 / 9 = 3. Next 3 x 4 = 1", 3, False,
     "               ++                +                "),  # cut inside "= 12": the last result may be cut too
    ("First 21 + 6 = 27. Then 27 / 9 = 3. The answer is 3.", 3, False,
     "               ++                +                  "),
]


def _marks(labels) -> str:
  return "".join({0: " ", 1: "+", -1: "-"}[int(v)] for v in labels)


@pytest.mark.parametrize("text,answer,finished,marks", CUT_CASES)
def test_a_cut_response_has_no_final_answer_label(text, answer, finished, marks):
  assert len(marks) == len(text)
  assert _marks(arith.char_labels(text, answer, finished=finished)) == marks


def test_arith_task_oracle_reads_which_samples_were_cut():
  """The arithmetic task's oracle (the credit program's and the smollm2_arith experiment's: the oracle arm's rewards
  and every token-credit table) looks each scored response up among the model's own samples (records.jsonl's
  all_finished) and labels a cut one without its final answer, token by token (SmolLM2's tokenizer); hand-labelled."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from tregjax import assets  # pylint: disable=g-import-not-at-top
  from tregjax.tasks import arith_experiment, sections  # pylint: disable=g-import-not-at-top
  question = "Noah has 21 minutes and gets 6 more. He splits them into 9 equal parts. How long is each part?"
  cut, done = CUT_CASES[1][0], CUT_CASES[4][0]
  finished_wrong = CUT_CASES[0][0]  # the same text as `cut`, but the model ended it: 21 is its wrong final answer
  task = arith_experiment.ArithTask(ml_collections.ConfigDict(dict(arith=sections.default_arith_config())))
  task.answers[question] = 3
  task.tokenizer_dir = str(assets.tokenizer_dir("smollm2"))
  other = "Ivy has 5 cards and finds 4 more. How many cards does Ivy have now?"
  task.answers[other] = 9
  task.read_finished([dict(prompt=[dict(role="user", content=question)], all_generated_responses=[cut, done],
                           all_finished=[False, True]),
                      dict(prompt=[dict(role="user", content=other)],
                           all_generated_responses=[finished_wrong, "5 + 4 = 9. The answer is 9."],
                           all_finished=[True, True])])
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  tok = AutoTokenizer.from_pretrained(task.tokenizer_dir, local_files_only=True)
  cases = ((question, cut, [("2", 1), ("7", 1), ("4", -1)]),
           (question, done, [("2", 1), ("7", 1), ("3", 1), ("3", 1)]),
           (other, finished_wrong, [("2", 1), ("7", 1), ("4", -1), ("2", -1), ("1", -1)]),
           (other, "5 + 4 = 9. The answer is 9.", [("9", 1), ("9", 1)]))
  for q, text, want in cases:
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = task.token_labels([dict(role="user", content=q)], ids)
    assert [(tok.decode([i]), int(v)) for i, v in zip(ids, labels) if v] == want, text
  # A finished sample truncated by the data pipeline (data.max_length) ends unseen: no final answer, like a cut one.
  # (As a finished response its last number, "27", would be a wrong final answer.)
  ids = tok(done[:done.index(" / 9")], add_special_tokens=False)["input_ids"]
  labels = task.token_labels([dict(role="user", content=question)], ids)
  assert [(tok.decode([i]), int(v)) for i, v in zip(ids, labels) if v] == [("2", 1), ("7", 1)]
  ids = tok("Something else = 5", add_special_tokens=False)["input_ids"]
  with pytest.raises(RuntimeError, match="none of the model's samples"):
    task.token_labels([dict(role="user", content=question)], ids)


def test_an_oracle_arm_scored_under_the_old_labels_is_refused(tmp_path):
  """The cut-answer rule changed the arithmetic oracle's labels, so it has a new oracle id: the oracle arm's stage key
  (and the scored cache's hash, which takes score.token_reward.oracle_id) differs, and a workdir whose oracle arm was
  trained under the old labels is refused rather than reused."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  from conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  from tregjax import errors  # pylint: disable=g-import-not-at-top
  from tregjax.experiments import runner, stages  # pylint: disable=g-import-not-at-top
  from tregjax.tasks import arith_experiment  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("arith_config", os.path.join(REPO_ROOT, "configs", "smollm2_arith.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  task = arith_experiment.ArithTask(config)
  root = str(tmp_path / "W")
  workdir = stages.Stages(root)
  prepared = stages.Prepared(reference=root + "/reference/hf", tokenizer=root + "/reference/hf",
                             train_pairs=root + "/samples/pairs.jsonl")
  key = stages.stage_key(runner.arm_stage(config, task, prepared, workdir, "dpo_reg_oracle"))
  assert key["score"]["token_reward"]["oracle_id"] == "smollm2-arith:token_labels:cut-answer"
  old = json.loads(json.dumps(key))
  old["score"]["token_reward"]["oracle_id"] = "smollm2-arith:token_labels"  # the id before the cut-answer rule
  os.makedirs(workdir.path("arms/dpo_reg_oracle"))
  with open(workdir.path("arms/dpo_reg_oracle/DONE"), "w", encoding="utf-8") as f:
    json.dump(dict(seconds=1.0, key=workdir.key_hash(old), key_json=workdir.key_json(old)), f)
  with pytest.raises(errors.StaleCacheError, match="oracle_id: 'smollm2-arith:token_labels' -> "
                                                   "'smollm2-arith:token_labels:cut-answer'"):
    workdir.done("arms/dpo_reg_oracle", key)
  # A task without its own id keeps the old naming (the synthetic world's workdirs stay current).
  plain = type("T", (), dict(name="w", section="arith"))()
  stage = runner.arm_stage(config, plain, prepared, workdir, "dpo_reg_oracle")
  assert stage.score.token_reward.oracle_id == "w:token_labels"


def test_per_model_budget():
  import ml_collections  # pylint: disable=g-import-not-at-top

  from tregjax import errors  # pylint: disable=g-import-not-at-top
  from tregjax.tasks import credit  # pylint: disable=g-import-not-at-top
  section = ml_collections.ConfigDict(dict(max_new_tokens=(("qwen2.5-coder-0.5b", 320),)))
  assert credit.budget(section, "qwen2.5-coder-0.5b", 128) == 320
  assert credit.budget(section, "smollm2", 128) == 128
  with pytest.raises(errors.ConfigError, match=r"config.credit.max_new_tokens: .* got \('smollm2', 0\)"):
    credit.budget(ml_collections.ConfigDict(dict(max_new_tokens=(("smollm2", 0),))), "smollm2", 128)
