"""The wheel ships every module of the three folders under the `logitcache` namespace, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pipeline": "logitcache/pipeline", "storage": "logitcache/storage", "train": "logitcache/train"}


def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("logitcache-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{dest}/{p.relative_to(ROOT / folder).as_posix()}"
        for folder, dest in PACKAGES.items()
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and (p.suffix == ".py" or p.name == "py.typed") and "__pycache__" not in p.parts
    }
    shipped = {n for n in names if n.startswith("logitcache/") and (n.endswith(".py") or n.endswith("py.typed"))}
    assert expected - shipped == set(), f"modules missing from the wheel: {sorted(expected - shipped)}"
    assert shipped - expected == set(), f"unexpected files in the wheel: {sorted(shipped - expected)}"
    assert "logitcache/__init__.py" not in names, "logitcache must stay a namespace package"
    assert any(n.endswith("entry_points.txt") for n in names)
