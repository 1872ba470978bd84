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
