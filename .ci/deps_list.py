"""Writes pyproject's dependency lists (plus the vLLM flavour) to OUT only when they changed.

The Makefile rebuilds the venv when OUT is newer than the venv, so editing tool settings in pyproject.toml
(ruff, mypy, pytest) does not trigger a multi-minute reinstall of torch and vLLM.
"""

import json
import sys
from pathlib import Path

import tomllib

pyproject, out, flavour = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
project = tomllib.loads(pyproject.read_text())["project"]
text = json.dumps(
    {
        "python": sys.version_info[:2],
        "flavour": flavour,
        "deps": project["dependencies"],
        "extras": project.get("optional-dependencies", {}),
    },
    indent=1,
    sort_keys=True,
)
if not out.exists() or out.read_text() != text:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
