"""Progress bars over images that a person can read: images per minute and the time left.

tqdm's own rate is per second (or seconds per image when slow); RIB takes seconds per image on a
CPU and thousands of images per hour on a GPU, so images per minute reads well at both ends.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} img [{elapsed} elapsed, {remaining} left, {rate_min}{postfix}]"


class ImageProgress(tqdm):
    """tqdm over images (give ``total`` or a sized iterable, or nothing is left to estimate) whose
    line reads the images per minute and the time left at that rate; a resumed run's ``initial``
    images do not count towards the rate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("unit", "img")
        kwargs.setdefault("bar_format", BAR_FORMAT)
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        done, elapsed = d["n"] - d.get("initial", 0), d["elapsed"]
        rate = d["rate"] or (done / elapsed if elapsed and done else None)  # tqdm's smoothed rate, per second
        d["rate_min"] = f"{60 * rate:.1f} img/min" if rate else "? img/min"
        return d
