"""``rib study``'s arithmetic: means, sample spreads and paired differences over seeds."""

from __future__ import annotations

import math

import pytest

from rib_core.experiments.study import markdown, summarise


def test_summary_pairs_each_seed_before_averaging():
    per_seed = {
        0: {"cam_seed": 0.30, "rib_gndrp_seed": 0.34, "seed_crf": 0.50, "irn_mask": 0.45},
        1: {"cam_seed": 0.40, "rib_gndrp_seed": 0.41, "seed_crf": 0.55, "irn_mask": 0.60},
        2: {"cam_seed": 0.20, "rib_gndrp_seed": 0.25, "seed_crf": 0.40, "irn_mask": 0.41},
    }
    s = summarise(per_seed)
    assert s["seeds"] == [0, 1, 2]
    assert s["table"]["cam_seed"]["mean"] == pytest.approx(0.30)
    assert s["table"]["cam_seed"]["std"] == pytest.approx(0.10)  # sample std (n - 1)
    gain = s["differences"]["rib_gndrp_seed - cam_seed"]
    assert gain["mean"] == pytest.approx((0.04 + 0.01 + 0.05) / 3)
    # paired: the spread of the differences, far below the spread of either row
    assert gain["std"] == pytest.approx(math.sqrt(((0.04 - 0.1 / 3) ** 2 + (0.01 - 0.1 / 3) ** 2
                                                   + (0.05 - 0.1 / 3) ** 2) / 2))
    assert "rib_gap_seed - cam_seed" not in s["differences"]  # rows not measured are left out
    assert "deeplab_fraction_of_full" not in s
    text = markdown(s)
    assert "| CAM seed | 30.0 | 10.0 |" in text and "| RIB-GNDRP seed - CAM seed | +3.3 |" in text


def test_deeplab_is_reported_as_a_fraction_of_full_supervision():
    per_seed = {0: {"deeplab_pseudo": 0.30, "deeplab_full": 0.60}, 1: {"deeplab_pseudo": 0.45, "deeplab_full": 0.50}}
    s = summarise(per_seed)
    assert s["deeplab_fraction_of_full"]["mean"] == pytest.approx((0.5 + 0.9) / 2)
