"""A planted pickle: what an attacker would put where a training job reads its state back."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunsCode:
    """Pickles as a call to ``open(marker, "w")``: loading it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")
