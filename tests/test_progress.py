"""The image progress bars of `rib rib` and `rib refine`: images per minute and the time left."""

from __future__ import annotations

import io
import re

from rib_core.runtime.progress import ImageProgress


def test_image_progress_shows_images_per_minute_and_time_left():
    out = io.StringIO()
    bar = ImageProgress(total=10, initial=4, desc="rib-gndrp", file=out, mininterval=0)
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(stop="iterations", steps=10)
    bar.close()
    last = out.getvalue().strip().split("\r")[-1]
    assert re.fullmatch(r"rib-gndrp:  70%\|.*\| 7/10 img \[\d\d:\d\d elapsed, \d\d:\d\d left, "
                        r"[\d.]+ img/min, steps=10, stop=iterations\]", last), last


def test_image_progress_over_a_list_knows_its_total():
    out = io.StringIO()
    assert list(ImageProgress(["a", "b"], desc="masks", file=out, mininterval=0)) == ["a", "b"]
    assert re.search(r"masks: 100%\|.*\| 2/2 img \[.* elapsed, .* left, ([\d.]+|\?) img/min\]", out.getvalue())
