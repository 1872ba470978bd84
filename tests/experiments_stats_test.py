"""The report's intervals against hand-computed values and brute-force counts."""

import itertools

import numpy as np

from tregjax.experiments import stats


def test_auc_equals_pairwise_count():
  rng = np.random.default_rng(0)
  pos, neg = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)
  naive = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
  assert abs(stats.auc(pos, neg) - naive) < 1e-12
  assert np.isnan(stats.auc([], [1.0]))


def test_wilson_matches_published_values():
  # 95% Wilson intervals: 0/10 -> [0, 0.2775]; 5/10 -> [0.2366, 0.7634]; 3/24 -> [0.0434, 0.3100]
  for k, n, low, high in ((0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (3, 24, 0.0434, 0.3100)):
    p, lo, hi = stats.wilson(k, n)
    assert p == k / n and abs(lo - low) < 1e-4 and abs(hi - high) < 1e-4, (k, n, lo, hi)


def test_paired_difference_by_hand():
  # differences 1, 0, 1, 1: mean 0.75, sample sd 0.5, half width t(3 df) 3.182 * 0.5 / 2
  mean, low, high = stats.paired_difference([1, 1, 1, 1], [0, 1, 0, 0])
  assert mean == 0.75 and abs(high - mean - 3.182 * 0.25) < 1e-12 and abs(mean - low - 3.182 * 0.25) < 1e-12
  # 500 paired problems: t(499 df) is z to three decimals
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
  mean, low, high = stats.paired_difference(a, b)
  d = (a - b).astype(float)
  assert abs((high - low) / 2 - 1.96 * d.std(ddof=1) / np.sqrt(500)) < 1e-4
  assert stats.t975(2) == 4.303 and stats.t975(25) == 2.086


def test_auc_interval_ignores_unlabelled_tokens_and_resamples_whole_responses():
  labels = np.array([1, -1, 0, 1, -1, 0, 1, 1, -1])
  groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  separating = np.where(labels > 0, 1.0, -1.0)
  separating[labels == 0] = 99.0  # unlabelled tokens must not count
  assert stats.auc_interval(separating, labels, groups) == (1.0, 1.0, 1.0)
  rng = np.random.default_rng(1)
  scores = rng.normal(size=labels.shape)
  point, low, high = stats.auc_interval(scores, labels, groups, resamples=200)
  assert point == stats.auc(scores[labels > 0], scores[labels < 0]) and low <= point <= high
