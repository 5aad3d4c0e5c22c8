"""Print the project's requirements (``pyproject.toml``'s dependencies plus the named extras), less
the packages named after ``--without``: what an image installs before ``pip install --no-deps .``,
so that the API image gets no torch (its process never imports it) while the list stays in one place.

    python requirements.py api export --without torch torchvision pydensecrf2
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str], without: set[str]) -> list[str]:
    """Requirement lines in pyproject order, each once; names compared as PEP 503 normalises them."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]

    def name(line: str) -> str:
        return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", line).group(0)).lower()  # type: ignore[union-attr]

    dropped = {re.sub(r"[-_.]+", "-", w).lower() for w in without}
    return list(dict.fromkeys(line for line in lines if name(line) not in dropped))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("extras", nargs="*")
    p.add_argument("--without", nargs="*", default=[])
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = p.parse_args()
    print("\n".join(requirements(args.pyproject, args.extras, set(args.without))))


if __name__ == "__main__":
    main()
