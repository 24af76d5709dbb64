"""The curriculum pseudo-sample generator (fssjax.data.pseudo_samples), properties measured on
the generated pixels: contrast falls and the support-query difference rises with difficulty,
matching the stated targets; given vertices go from 15 to 0; determinism; masks and polygons
agree.
"""

from __future__ import annotations

import numpy as np
import pytest

from fssjax.data.pseudo_samples import (PseudoSampleSpec, curriculum_difficulty,
                                        make_pseudo_sample, pseudo_samples)
from fssjax.priors.polygons import mask_iou, polygons_to_mask

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
SEEDS = range(6)


def _measure(s):
  """(min over images of the fg to nearest-region distance, support-query fg distance),
  from the pixels (mean colours in [0, 1] units)."""
  contrasts = []
  fg = []
  for img, lab in ((s.support_image, s.labels[0]), (s.query_image, s.labels[1])):
    x = img.astype(np.float64) / 255.0
    f = x[lab == 0].mean(0)
    fg.append(f)
    contrasts.append(min(np.linalg.norm(f - x[lab == r].mean(0))
                         for r in range(1, int(lab.max()) + 1)))
  return min(contrasts), float(np.linalg.norm(fg[0] - fg[1]))


def test_difficulty_moves_contrast_shift_and_given_vertices():
  spec = PseudoSampleSpec()
  rows = []
  for d in LEVELS:
    m = np.array([_measure(make_pseudo_sample(seed, d)) for seed in SEEDS])
    shift, contrast, given = spec.at(d)
    # Measured means are within 0.015 of the targets (noise std 0.06 over >= hundreds of px).
    np.testing.assert_allclose(m[:, 0], contrast, atol=0.015)
    np.testing.assert_allclose(m[:, 1], shift, atol=0.015)
    rows.append((m[:, 0].mean(), m[:, 1].mean(), given))
  contrast, shift, given = map(np.array, zip(*rows))
  assert np.all(np.diff(contrast) < -0.05), contrast      # contrast falls
  assert np.all(np.diff(shift) > 0.05), shift             # support-query difference rises
  assert given.tolist() == [15, 11, 8, 4, 0]              # round((1 - d) * 15)
  assert contrast[0] > 0.4 and contrast[-1] < 0.12 and shift[0] < 0.02 and shift[-1] > 0.28


def test_sample_contents_and_polygons():
  for seed, d in ((0, 0.0), (1, 0.3), (2, 1.0)):
    s = make_pseudo_sample(seed, d)
    for img, mask, polys, lab in ((s.support_image, s.support_mask, s.support_polygons,
                                   s.labels[0]),
                                  (s.query_image, s.query_mask, s.query_polygons, s.labels[1])):
      assert img.shape == (64, 64, 3) and img.dtype == np.uint8
      assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 1}
      np.testing.assert_array_equal(lab == 0, mask == 1)
      assert 0.03 < mask.mean() < 0.5
      assert 2 <= lab.max() <= 4 and all((lab == r).any() for r in range(1, lab.max() + 1))
      assert len(polys) == 1 and polys[0].shape == (16, 2)
      assert mask_iou(polygons_to_mask(polys, 64, 64), mask) > 0.85
    assert s.given_vertices == len(s.given_points)
    np.testing.assert_array_equal(s.given_points, s.query_polygons[0][:s.given_vertices])
    # The foreground means are where the spec says, at exactly `shift` apart.
    assert np.all((s.fg_means[0] >= 0.3) & (s.fg_means[0] <= 0.7))
    assert np.linalg.norm(s.fg_means[0] - s.fg_means[1]) == pytest.approx(s.shift, abs=1e-9)
    for fg, bg in zip(s.fg_means, s.bg_means):
      dists = [np.linalg.norm(fg - b) for b in bg]
      assert dists[0] == pytest.approx(s.contrast, abs=1e-9)
      assert all(s.contrast - 1e-9 <= x <= 1.2 * s.contrast + 1e-9 for x in dists)


def test_determinism_and_seed_independence_of_geometry():
  a, b = make_pseudo_sample(5, 0.4), make_pseudo_sample(5, 0.4)
  for f in ("support_image", "query_image", "support_mask", "query_mask"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  c = make_pseudo_sample(6, 0.4)
  assert not np.array_equal(a.query_mask, c.query_mask)
  # One seed, two difficulties: same shapes and regions, different colours.
  e, h = make_pseudo_sample(5, 0.0), make_pseudo_sample(5, 1.0)
  np.testing.assert_array_equal(e.labels[1], h.labels[1])
  assert np.abs(e.query_image.astype(int) - h.query_image.astype(int)).mean() > 5
  with pytest.raises(ValueError, match="difficulty"):
    make_pseudo_sample(0, 1.5)


def test_curriculum():
  assert [curriculum_difficulty(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert curriculum_difficulty(3, 1) == 1.0 and curriculum_difficulty(9, 5) == 1.0
  got = list(pseudo_samples(0, 3))
  assert [s.difficulty for s in got] == [0.0, 0.5, 1.0]
  assert [s.given_vertices for s in got] == [15, 8, 0]
  fixed = list(pseudo_samples(0, 2, difficulty=0.2))
  assert [s.difficulty for s in fixed] == [0.2, 0.2]
  small = make_pseudo_sample(0, 0.5, PseudoSampleSpec(size=32, max_given=7))
  assert small.query_image.shape == (32, 32, 3) and small.given_vertices == 4
