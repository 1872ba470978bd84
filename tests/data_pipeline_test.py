"""grain pipeline over a tokenized TFDS dataset: order, sharding, restore, layout, buckets, packing."""

import json
import os
import sys

import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import data_common as dc  # noqa: E402

from tregjax import data  # noqa: E402
from tregjax.data import pipeline, tfds_builder  # noqa: E402

BUCKETS = (32, 64, 128)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  tok = dc.byte_level_bpe(str(root / "tok"))
  f = dc.write_jsonl(str(root / "a.jsonl"), dc.pair_records(37, seed=5))
  cfg = ml_collections.ConfigDict(dict(data=data.default_data_config()))
  cfg.data.update(train_files=[f], tokenizer=tok, dataset_dir=str(root / "ds"), max_prompt_length=60,
                  max_length=128)
  out = data.build_dataset(cfg)
  src = tfds_builder.data_source(out, "train")
  records = [src[i] for i in range(len(src))]
  return out, records


def _segments(side, row):
  """(tokens, labels, loss_mask, positions) of each segment of one row, in segment order."""
  seg = side.segment_ids[row]
  out = []
  for k in range(1, seg.max() + 1):
    idx = np.nonzero(seg == k)[0]
    out.append(tuple(np.asarray(a[row, idx]) for a in (side.tokens, side.labels, side.loss_mask, side.positions)))
  return out


def _record_index(records):
  return {tuple(np.concatenate([r["prompt_ids"], r["chosen_ids"]])): i for i, r in enumerate(records)}


def _ids_of(batch, index):
  """Record indices held by a batch, in row/segment order (padding rows skipped)."""
  out = []
  for row in range(batch.chosen.tokens.shape[0]):
    for tokens, *_ in _segments(batch.chosen, row):
      out.append(index[tuple(tokens)])
  return out


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_rows_follow_the_token_alignment_convention(dataset):
  out, records = dataset
  index = _record_index(records)
  (batch,) = _take(pipeline.make_iterator(out, global_batch_size=4, buckets=BUCKETS, seed=0, process_index=0,
                                          process_count=1), 1)
  for side in ("chosen", "rejected"):
    sb = getattr(batch, side)
    for row, i in enumerate(_ids_of(batch, index)):
      r = records[i]
      ids = np.concatenate([r["prompt_ids"], r[f"{side}_ids"]])
      n, p = len(ids), len(r["prompt_ids"])
      np.testing.assert_array_equal(sb.tokens[row, :n], ids)
      np.testing.assert_array_equal(sb.labels[row, :n - 1], ids[1:])
      want_mask = np.zeros(sb.tokens.shape[1])
      want_mask[p - 1:n - 1] = 1  # labels[t] is a response token
      np.testing.assert_array_equal(sb.loss_mask[row], want_mask)
      np.testing.assert_array_equal(sb.segment_ids[row], (np.arange(sb.tokens.shape[1]) < n).astype(np.int32))
      np.testing.assert_array_equal(sb.positions[row, :n], np.arange(n))
  assert batch.chosen.tokens.shape == batch.rejected.tokens.shape
  assert batch.ref_chosen_logps.shape == (4,) and not batch.chosen_token_rewards.any()  # unscored: zeros


def test_same_seed_same_order_and_other_seed_other_order(dataset):
  out, records = dataset
  index = _record_index(records)

  def order(seed):
    it = pipeline.make_iterator(out, global_batch_size=4, buckets=BUCKETS, seed=seed, num_epochs=2,
                                process_index=0, process_count=1)
    return [i for b in it for i in _ids_of(b, index)]

  a, b, c = order(1), order(1), order(2)
  assert a == b and a != c
  half = len(a) // 2
  assert a[:half] != a[half:]  # epochs are reshuffled


def test_process_shards_are_disjoint_and_cover_the_data(dataset):
  out, records = dataset
  index = _record_index(records)
  seen, shapes = [], []
  for p in range(3):
    it = pipeline.make_iterator(out, global_batch_size=6, buckets=BUCKETS, seed=3, num_epochs=1,
                                drop_remainder=False, process_index=p, process_count=3)
    batches = list(it)
    shapes.append([b.chosen.tokens.shape for b in batches])
    seen.extend(i for b in batches for i in _ids_of(b, index))
  assert sorted(seen) == list(range(len(records)))  # every record once: disjoint and covering
  assert shapes[0] == shapes[1] == shapes[2]  # same T on every host at every step
  assert all(s == (2, shapes[0][k][1]) for k, s in enumerate(shapes[0]))


def test_buckets_bound_the_shapes_and_fit_each_batch(dataset):
  out, records = dataset
  it = pipeline.make_iterator(out, global_batch_size=2, buckets=BUCKETS, seed=0, num_epochs=1,
                              process_index=0, process_count=1)
  for b in it:
    t = b.chosen.tokens.shape[1]
    assert t in BUCKETS
    longest = max(b.chosen.segment_ids.sum(1).max(), b.rejected.segment_ids.sum(1).max())
    assert longest <= t and (t == BUCKETS[0] or longest > BUCKETS[BUCKETS.index(t) - 1])


def test_fitted_buckets_shrink_to_the_longest_row_they_hold():
  """Hand-worked: pairs whose longer rows are 150, 170, 200 (bucket 256) and 60 (bucket 64), FIT_MULTIPLE 8."""
  lengths = np.array([[130, 150], [160, 170], [40, 60], [200, 100]])
  kwargs = dict(global_batch_size=1, buckets=(64, 128, 256, 512), seed=0, shuffle=False, packing=False,
                drop_remainder=False, process_index=0, process_count=1)
  plain, fitted = pipeline.BatchPlan(lengths, **kwargs), pipeline.BatchPlan(lengths, fit_buckets=True, **kwargs)
  assert plain.unit_bucket.tolist() == [256, 256, 64, 256]
  assert fitted.unit_bucket.tolist() == [200, 200, 64, 200] and fitted.buckets == (64, 200)
  assert sorted(fitted.local(k)[0] for k in range(4)) == [64, 200, 200, 200]
  odd = pipeline.BatchPlan(np.array([[130, 131]]), fit_buckets=True, **kwargs)
  assert odd.buckets == (136,)  # 131 rounded up to a multiple of 8


@pytest.mark.parametrize("length, buckets, extend, want", [
    (1, (64, 128, 256), False, 64),
    (64, (64, 128, 256), False, 64),  # a bucket holds rows of exactly its length
    (65, (64, 128, 256), False, 128),
    (256, (64, 128, 256), False, 256),
    (65, (256, 64, 128), False, 128),  # the smallest that fits, not the first listed that fits (256)
    (300, (64, 128, 256), True, 512),  # past the largest: the next multiple of it (score, generate)
    (512, (64, 128, 256), True, 512),
    (513, (256, 64, 128), True, 768),
    (40, (32,), True, 64),
    (10, (64, 128, 256), True, 64),  # `extend` changes nothing below the largest bucket
])
def test_bucket_of_by_hand(length, buckets, extend, want):
  assert pipeline.bucket_of(length, buckets, extend=extend) == want


def test_bucket_of_refuses_a_row_past_the_largest_bucket_unless_extended():
  with pytest.raises(ValueError, match="a row of 257 tokens exceeds the largest bucket 256"):
    pipeline.bucket_of(257, (128, 256, 64))


def test_fitted_buckets_helper_by_hand():
  assert pipeline.fitted_buckets([60, 150, 170, 200, 900], (64, 128, 256, 512)) == {64: 64, 256: 200}
  assert pipeline.fitted_buckets([121], (64, 128)) == {128: 128}  # 121 -> 128: a multiple of 8, not past the bucket
  assert pipeline.fitted_buckets([60, 150, 201], (64, 128, 256), steps=8) == {64: 64, 256: 224}  # 256/8 = 32


def test_fitted_batches_hold_the_same_pairs_with_less_padding(dataset):
  out, _ = dataset
  kw = dict(global_batch_size=2, buckets=BUCKETS, seed=0, num_epochs=1, process_index=0, process_count=1)
  for a, b in zip(pipeline.make_iterator(out, **kw), pipeline.make_iterator(out, fit_buckets=True, **kw)):
    ta, tb = a.chosen.tokens.shape[1], b.chosen.tokens.shape[1]
    longest = max(b.chosen.segment_ids.sum(1).max(), b.rejected.segment_ids.sum(1).max())
    assert longest <= tb <= ta and (tb % pipeline.FIT_MULTIPLE == 0 or tb == ta)
    np.testing.assert_array_equal(a.chosen.tokens[:, :tb], b.chosen.tokens)
    np.testing.assert_array_equal(a.rejected.loss_mask[:, :tb], b.rejected.loss_mask)
    assert not a.chosen.segment_ids[:, tb:].any()  # only padding was cut


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_state_continues_exactly(dataset, num_workers):
  out, _ = dataset
  kwargs = dict(global_batch_size=4, buckets=BUCKETS, seed=7, process_index=0, process_count=1,
                num_workers=num_workers)
  it = pipeline.make_iterator(out, **kwargs)
  _take(it, 5)  # mid-epoch (9 batches per epoch)
  state = json.loads(json.dumps(it.get_state()))
  want = _take(it, 6)  # crosses into the next epoch
  fresh = pipeline.make_iterator(out, **kwargs)
  fresh.set_state(state)
  got = _take(fresh, 6)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w.chosen.tokens, g.chosen.tokens)
    np.testing.assert_array_equal(w.rejected.loss_mask, g.rejected.loss_mask)


def test_packed_rows_equal_separate_rows_and_waste_less(dataset):
  out, records = dataset
  index = _record_index(records)
  packed = list(pipeline.make_iterator(out, global_batch_size=2, buckets=BUCKETS, packing=True, seed=0, num_epochs=1,
                                       drop_remainder=False, process_index=0, process_count=1))
  seen = []
  for b in packed:
    for row in range(b.chosen.tokens.shape[0]):
      ids = [index[tuple(s[0])] for s in _segments(b.chosen, row)]
      seen.extend(ids)
      # Each segment equals that record laid out on its own; the rejected row holds the same records in order.
      for side in ("chosen", "rejected"):
        segments = _segments(getattr(b, side), row)
        assert len(segments) == len(ids)
        for i, (tokens, labels, mask, positions) in zip(ids, segments):
          r = records[i]
          want = np.concatenate([r["prompt_ids"], r[f"{side}_ids"]])
          np.testing.assert_array_equal(tokens, want)
          np.testing.assert_array_equal(labels[:-1], want[1:])
          assert labels[-1] == 0 and mask[-1] == 0  # no label crosses into the next segment
          np.testing.assert_array_equal(np.nonzero(mask)[0], np.arange(len(r["prompt_ids"]) - 1, len(want) - 1))
          np.testing.assert_array_equal(positions, np.arange(len(want)))
  assert sorted(seen) == list(range(len(records)))
  unpacked = list(pipeline.make_iterator(out, global_batch_size=2, buckets=(BUCKETS[-1],), seed=0, num_epochs=1,
                                         drop_remainder=False, process_index=0, process_count=1))
  def waste(batches):
    real = sum(b.chosen.segment_ids.astype(bool).sum() for b in batches)
    return 1 - real / sum(b.chosen.tokens.size for b in batches)
  assert waste(packed) < 0.75 * waste(unpacked)


def test_trainer_config_section_selects_dataset_and_batch_settings(dataset):
  out, records = dataset
  root = os.path.dirname(os.path.dirname(os.path.dirname(out)))  # the data_dir build_dataset wrote into
  section = data.default_data_config()
  section.update(dataset_dir=root, batch_size=4, buckets=BUCKETS, seed=11)
  section.cache_dir = ""
  it = pipeline.make_iterator(section, "train", objective="sft", process_index=0, process_count=1)
  direct = pipeline.make_iterator(out, global_batch_size=4, buckets=BUCKETS, seed=11, process_index=0,
                                  process_count=1, fit_buckets=True)  # the section's default
  assert len(it) == len(direct) <= len(records) // 4  # batches per epoch (drop_remainder per bucket may lower it)
  np.testing.assert_array_equal(next(it).chosen.tokens, next(direct).chosen.tokens)
  with pytest.raises(ValueError, match="scored cache"):
    section.cache_dir = out
    pipeline.make_iterator(section, "train", objective="preference", process_index=0, process_count=1)


def test_scored_fields_land_on_label_positions_unpacked_and_packed(tmp_path):
  """Per-token arrays stored in response coordinates appear where loss_mask is 1, in order; sums per row."""
  rng = np.random.default_rng(0)
  examples = []
  for i in range(10):
    p, c, r = rng.integers(2, 9), rng.integers(1, 7), rng.integers(1, 7)
    examples.append(dict(
        prompt_ids=rng.integers(3, 50, p).astype(np.int32), chosen_ids=rng.integers(3, 50, c).astype(np.int32),
        rejected_ids=rng.integers(3, 50, r).astype(np.int32), prompt_messages="[]", example_id=str(i),
        ref_chosen_logps=np.float32(-i), ref_rejected_logps=np.float32(-2 * i),
        ref_chosen_token_logps=rng.normal(size=c).astype(np.float32),
        ref_rejected_token_logps=rng.normal(size=r).astype(np.float32),
        chosen_token_rewards=rng.normal(size=c).astype(np.float32),
        rejected_token_rewards=rng.normal(size=r).astype(np.float32), token_reward_source="contrastive"))
  out = tfds_builder.write("scored", str(tmp_path), "htest", {"train": lambda: iter(examples)},
                           dict(kind="scored", hash="x", pad_id=0))
  by_tokens = {tuple(np.concatenate([e["prompt_ids"], e["chosen_ids"]])): e for e in examples}
  for packing in (False, True):
    seen = 0
    for b in pipeline.make_iterator(out, global_batch_size=2, buckets=(16, 32), packing=packing, num_epochs=1,
                                    drop_remainder=False, process_index=0, process_count=1):
      for row in range(2):
        want_sum = {"chosen": 0.0, "rejected": 0.0}
        chosen_segments = _segments(b.chosen, row)
        for k, (tokens, *_rest) in enumerate(chosen_segments):
          e = by_tokens[tuple(tokens)]
          seen += 1
          for side in ("chosen", "rejected"):
            sb = getattr(b, side)
            idx = np.nonzero(sb.segment_ids[row] == k + 1)[0]
            on = idx[sb.loss_mask[row, idx] > 0]
            np.testing.assert_array_equal(getattr(b, f"ref_{side}_token_logps")[row, on],
                                          e[f"ref_{side}_token_logps"])
            np.testing.assert_array_equal(getattr(b, f"{side}_token_rewards")[row, on], e[f"{side}_token_rewards"])
            want_sum[side] += float(e[f"ref_{side}_logps"])
        for side in ("chosen", "rejected"):
          off = getattr(b, side).loss_mask[row] == 0
          assert not getattr(b, f"{side}_token_rewards")[row, off].any()
          np.testing.assert_allclose(getattr(b, f"ref_{side}_logps")[row], want_sum[side])
    assert seen == 10
