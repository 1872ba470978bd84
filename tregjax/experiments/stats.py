"""Intervals for the experiment reports: every figure a run prints comes with its 95% interval.

Accuracy: Wilson score interval (honest at small n and near 0 or 1, unlike the normal approximation). Arm minus
baseline on the same problems: a paired interval on the per-problem differences. Token-credit ROC-AUC: a bootstrap
over responses (tokens of one response are not independent, so resampling tokens would understate the width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
  """P(score of a random positive > a random negative), ties counted half (Mann-Whitney U / (n_pos·n_neg))."""
  positive, negative = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
  if len(positive) == 0 or len(negative) == 0:
    return float("nan")
  scores = np.concatenate([positive, negative])
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  # average 1-based rank of each distinct value: (first rank + last rank) / 2
  last = np.cumsum(counts)
  average_rank = last - (counts - 1) / 2.0
  rank_sum = average_rank[inverse[:len(positive)]].sum()
  return float((rank_sum - len(positive) * (len(positive) + 1) / 2.0) / (len(positive) * len(negative)))


def auc_interval(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, resamples: int = 300,
                 seed: int = 0) -> tuple[float, float, float]:
  """(AUC of scores at ranking label +1 above label −1, 95% low, high); label 0 tokens are ignored.

  The interval is a percentile bootstrap over `groups` (one id per response): whole responses are resampled.
  """
  scores, labels, groups = np.asarray(scores, np.float64), np.asarray(labels), np.asarray(groups)
  if not scores.shape == labels.shape == groups.shape:
    raise ValueError(f"scores {scores.shape}, labels {labels.shape} and groups {groups.shape} must have one shape")
  keep = labels != 0
  scores, labels, groups = scores[keep], labels[keep], groups[keep]
  point = auc(scores[labels > 0], scores[labels < 0])
  if math.isnan(point):
    return point, float("nan"), float("nan")
  ids, group_index = np.unique(groups, return_inverse=True)
  members = [np.flatnonzero(group_index == g) for g in range(len(ids))]
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(resamples):
    take = np.concatenate([members[g] for g in rng.integers(0, len(ids), len(ids))])
    value = auc(scores[take][labels[take] > 0], scores[take][labels[take] < 0])
    if not math.isnan(value):
      draws.append(value)
  low, high = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
  return point, float(low), float(high)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float, float]:
  """(proportion, 95% low, high) by the Wilson score interval."""
  if n <= 0:
    return float("nan"), float("nan"), float("nan")
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return p, max(0.0, centre - half), min(1.0, centre + half)


# Student t 97.5% quantiles by degrees of freedom (a few seeds need t, not z: with 3 seeds the half-width is 2.2× z's).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
  """The two-sided 95% Student t quantile (the next smaller tabulated df, which errs wide; z beyond 120)."""
  if df < 1:
    return float("nan")
  if df > 120:
    return Z95
  return _T975[max(k for k in _T975 if k <= df)]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
  """(mean of a − b, 95% low, high) over paired observations (the same problems under two policies), by Student t."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if d.size == 0:
    return float("nan"), float("nan"), float("nan")
  half = t975(d.size - 1) * d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else float("nan")
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
  """(mean, 95% low, high) by Student t (e.g. over seeds or prompts)."""
  return paired_difference(values, np.zeros(len(values)))
