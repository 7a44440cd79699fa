"""Patch draws for 3D training: a function of (seed, epoch, index), split over processes,
the foreground share, and patches cut from volumes smaller than the patch."""

import numpy as np
import pytest

from medseg_jax.data import patches
from medseg_jax.errors import ConfigError

PATCH = (4, 6, 6)


def _volumes(shapes=((10, 20, 24), (8, 16, 16), (12, 20, 18), (6, 30, 12))):
  """Images [D,H,W,1] and labels [D,H,W] with one small blob of class 1 or 2 each, so a
  random patch often misses the foreground."""
  rng = np.random.default_rng(7)
  images, labels = [], []
  for v, shape in enumerate(shapes):
    label = np.zeros(shape, np.uint8)
    d, h, w = (int(rng.integers(0, s - 1)) for s in shape)
    label[d:d + 2, h:h + 2, w:w + 2] = 1 + v % 2
    images.append(rng.normal(size=shape + (1,)).astype(np.float32))
    labels.append(label)
  return images, labels


def _sampler(labels, fraction=1 / 3, global_batch=6, patch=PATCH):
  return patches.Sampler(shapes=tuple(l.shape for l in labels),
                         locations=tuple(patches.foreground_locations(l) for l in labels),
                         patch=patch, fraction=fraction, global_batch=global_batch)


def test_a_draw_is_a_function_of_seed_epoch_and_index():
  _, labels = _volumes()
  first, again = _sampler(labels), _sampler(labels)
  draws = [first.draw(3, 2, i) for i in range(30)]
  assert draws == [again.draw(3, 2, i) for i in reversed(range(30))][::-1]
  other_seed = [first.draw(4, 2, i) for i in range(30)]
  other_epoch = [first.draw(3, 5, i) for i in range(30)]
  assert sum(a != b for a, b in zip(draws, other_seed)) > 20
  assert sum(a != b for a, b in zip(draws, other_epoch)) > 20
  # The corner alone (same volume) changes with the seed, the epoch and the index.
  unforced = _sampler(labels, fraction=0.0)
  corners = {(s, e, i): unforced.place(s, e, i, 0).corner
             for s in (3, 4) for e in (2, 5) for i in range(20)}
  assert len(set(corners.values())) > 70
  # Every volume appears once in each pass over the volumes (the loader's epoch order).
  for start in range(0, 28, 4):
    assert sorted(d.volume for d in draws[start:start + 4]) == [0, 1, 2, 3]


def test_random_corners_lie_inside_and_spread():
  _, labels = _volumes()
  sampler = _sampler(labels, fraction=0.0)
  draws = [sampler.draw(0, 0, i) for i in range(400)]
  for d in draws:
    high = np.array(labels[d.volume].shape) - PATCH
    assert not d.forced and np.all(np.array(d.corner) >= 0) and np.all(d.corner <= high)
  corners = {d.corner for d in draws if d.volume == 0}
  assert len(corners) > 50  # not a handful of fixed positions


@pytest.mark.parametrize("process_count", [1, 2, 3, 6])
def test_processes_split_each_global_batch(process_count):
  _, labels = _volumes()
  sampler = _sampler(labels)
  whole = [sampler.draw(1, 0, i) for i in range(24)]  # 24 draws: 4 global batches of 6
  parts = [list(patches.global_batch_draws(sampler, 1, 0, p, process_count, draws=24))
           for p in range(process_count)]
  for b in range(4):
    rows = [row for part in parts for row in part[b]]  # process order, contiguous rows
    assert rows == whole[6 * b:6 * b + 6]
    local = 6 // process_count
    assert all(len(part[b]) == local for part in parts)


def test_resume_from_an_offset_draws_the_rest_of_the_epoch():
  _, labels = _volumes()
  sampler = _sampler(labels)
  full = list(patches.global_batch_draws(sampler, 5, 1, draws=30))
  resumed = list(patches.global_batch_draws(sampler, 5, 1, offset=12, draws=30))
  assert len(full) == 5 and resumed == full[2:]


def _contains_foreground(labels, draw):
  return bool(patches.cut(labels[draw.volume], draw.corner, PATCH).any())


@pytest.mark.parametrize("fraction,global_batch,forced", [(1 / 3, 6, 2), (1 / 3, 4, 2),
                                                          (0.5, 2, 1), (0.1, 30, 3)])
def test_foreground_share(fraction, global_batch, forced):
  _, labels = _volumes()
  sampler = _sampler(labels, fraction, global_batch)
  assert patches.forced_count(global_batch, fraction) == forced
  batches = list(patches.global_batch_draws(sampler, 0, 0, draws=global_batch * 20))
  for batch in batches:
    assert [d.forced for d in batch] == [False] * (global_batch - forced) + [True] * forced
  draws = [d for batch in batches for d in batch]
  assert all(_contains_foreground(labels, d) for d in draws if d.forced)
  with_foreground = sum(_contains_foreground(labels, d) for d in draws)
  assert with_foreground / len(draws) >= fraction
  # The random draws alone would miss the small blobs most of the time.
  unforced = [d for d in draws if not d.forced]
  assert sum(_contains_foreground(labels, d) for d in unforced) < 0.5 * len(unforced)


def test_forced_draws_pick_every_foreground_class():
  label = np.zeros((20, 20, 20), np.uint8)
  label[1, 1, 1], label[18, 18, 18] = 1, 2  # one voxel each, at opposite corners
  sampler = _sampler([label], fraction=1.0, global_batch=1)
  draws = [sampler.draw(0, 0, i) for i in range(60)]
  found = {int(patches.cut(label, d.corner, PATCH).max()) for d in draws}
  assert found == {1, 2}
  assert {d.corner for d in draws} == {(0, 0, 0), (16, 14, 14)}  # clipped inside


def test_a_volume_without_foreground_gets_random_draws():
  label = np.zeros((10, 10, 10), np.uint8)
  sampler = _sampler([label], fraction=1.0, global_batch=2)
  assert not any(sampler.draw(0, 0, i).forced for i in range(10))


def test_foreground_locations_are_a_bounded_sample():
  label = np.zeros((10, 10, 10), np.uint8)
  label[2:8, 2:8, 2:8] = 3
  found = patches.foreground_locations(label, max_per_class=50, seed=1)
  assert list(found) == [3] and found[3].shape == (50, 3)
  assert np.all(label[tuple(found[3].T)] == 3)
  assert len(np.unique(found[3], axis=0)) == 50
  again = patches.foreground_locations(label, max_per_class=50, seed=1)
  np.testing.assert_array_equal(found[3], again[3])


def test_a_volume_smaller_than_the_patch_is_centred_and_padded():
  image = np.arange(3 * 10 * 5, dtype=np.float32).reshape(3, 10, 5, 1) + 1
  label = np.ones((3, 10, 5), np.uint8)
  patch = (8, 8, 8)  # larger along D and W, smaller along H
  sampler = patches.Sampler(shapes=(label.shape,),
                            locations=(patches.foreground_locations(label),),
                            patch=patch, fraction=0.5, global_batch=2)
  for i in range(10):
    draw = sampler.draw(0, 0, i)
    assert draw.corner[0] == -2 and draw.corner[2] == -1 and 0 <= draw.corner[1] <= 2
    got = patches.read_batch([image], [label], [draw], patch)
    h = draw.corner[1]
    # Reference: pad by hand (2 before and 3 after along D, 1 and 2 along W).
    want = np.pad(image[:, h:h + 8], ((2, 3), (0, 0), (1, 2), (0, 0)))
    np.testing.assert_array_equal(got["image"][0], want)
    np.testing.assert_array_equal(got["label"][0], np.pad(label[:, h:h + 8],
                                                          ((2, 3), (0, 0), (1, 2))))
    assert got["label"].dtype == np.uint8


def test_cut_pads_where_the_patch_sticks_out():
  volume = np.arange(5 * 5 * 5, dtype=np.float32).reshape(5, 5, 5)
  got = patches.cut(volume, (-1, 3, 0), (3, 3, 3), pad_value=-7)
  want = np.full((3, 3, 3), -7, np.float32)
  want[1:, :2, :] = volume[0:2, 3:5, 0:3]
  np.testing.assert_array_equal(got, want)
  assert np.all(patches.cut(volume, (9, 9, 9), (2, 2, 2)) == 0)


@pytest.mark.parametrize("patch,fraction,key", [((4, 4), 0.3, "data.patch_size"),
                                                ((4, 0, 4), 0.3, "data.patch_size"),
                                                ((4, 4, 4), 1.5, "data.foreground_fraction")])
def test_bad_settings_name_their_key(patch, fraction, key):
  with pytest.raises(ConfigError, match=key):
    patches.check_settings(patch, fraction)
