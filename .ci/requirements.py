"""Print the requirements pyproject.toml declares for kubetune and the given extras, one a line.

    python .ci/requirements.py trainer > requirements.txt

The images install these before they copy the source (operator_image/Dockerfile, trainer_image/Dockerfile),
so a source change reuses the dependency layers; e2e/harness/images.py fills its wheelhouse from the same list.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements(*extras: str) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    out = list(project["dependencies"])
    for extra in extras:
        out += project["optional-dependencies"][extra]
    return list(dict.fromkeys(out))


if __name__ == "__main__":
    print("\n".join(requirements(*sys.argv[1:])))
