"""One config-to-CLI mechanism: every config field of each command has its option, with the field's default, and
every option is a field (or one of the few hand-written ones); one config-file loader for both stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from logitcache.pipeline.cli import cache_teacher
from logitcache.pipeline.config import CaptureConfig
from logitcache.storage.options import ConfigFileError, load_config_file, option_fields
from logitcache.train.cli import _resolve, train_student
from logitcache.train.config import TrainConfig

REQUIRED = {"cache": "c", "student": "s", "output": "o", "teacher": "t", "dataset": "d"}
COMMANDS = [
    (cache_teacher, CaptureConfig, {"config_file", "engine_arg"}, ("engine_args",)),
    (train_student, TrainConfig, {"config_file"}, ()),
]


def _defaults_seen_by_the_command(command: click.Command, cls: type) -> dict[str, Any]:
    """The config a command builds when no option is given (required fields aside)."""
    seen: dict[str, Any] = {}

    def capture(**kwargs: Any) -> None:
        flags = {k: v for k, v in kwargs.items() if k not in ("config_file", "engine_arg")}
        names = {f.name for f in dataclasses.fields(cls)}
        flags.update({k: v for k, v in REQUIRED.items() if k in names})
        cfg = (
            _resolve(None, flags) if cls is TrainConfig else CaptureConfig.from_sources(None, engine_args=None, **flags)
        )
        seen.update(dataclasses.asdict(cfg))

    assert command.callback is not None
    original = command.callback
    command.callback = capture
    try:
        result = CliRunner().invoke(command, [], catch_exceptions=False)
    finally:
        command.callback = original
    assert result.exit_code == 0, result.output
    return seen


@pytest.mark.parametrize(("command", "cls", "extra", "exclude"), COMMANDS, ids=lambda x: getattr(x, "name", ""))
def test_every_field_has_its_option_and_every_option_a_field(
    command: click.Command, cls: type, extra: set[str], exclude: tuple[str, ...]
) -> None:
    options = {p.name for p in command.params if isinstance(p, click.Option) and p.name != "help"}
    fields = {f.name for f in option_fields(cls, exclude)}
    assert options - extra == fields
    for p in command.params:
        if p.name in fields:
            flag = "--" + p.name.replace("_", "-")
            assert flag in p.opts, (p.name, p.opts)
            assert p.default is None  # "not given": a --config file value applies, a flag overrides it


# Fields whose default None is resolved by the config from the other settings, and what it resolves to when none
# is given: cache-teacher's target mode (CaptureConfig._implied_targets).
RESOLVED = {"targets": "sampled"}


@pytest.mark.parametrize(("command", "cls", "extra", "exclude"), COMMANDS, ids=lambda x: getattr(x, "name", ""))
def test_no_option_given_means_the_fields_defaults(
    command: click.Command, cls: type, extra: set[str], exclude: tuple[str, ...]
) -> None:
    seen = _defaults_seen_by_the_command(command, cls)
    for f in option_fields(cls, exclude):
        if f.name in REQUIRED:
            continue
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if f.name in RESOLVED:  # None means "resolved from the other settings" (the config says how)
            assert want is None and seen[f.name] == RESOLVED[f.name], f.name
            continue
        assert seen[f.name] == want, f.name
        help_text = next(p.help for p in command.params if p.name == f.name) or ""
        if want not in (None, False):
            assert (f"[default: {want}]" in help_text) or (want is True and "[default: on]" in help_text), help_text


def test_false_booleans_are_positive_flags() -> None:
    opts = {p.name: p for p in train_student.params}
    assert opts["no_tail"].opts == ["--no-tail"] and not opts["no_tail"].secondary_opts
    assert opts["progress"].secondary_opts == ["--no-progress"]


def test_one_loader_for_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("top-k: 8\nbatch_size: 4\n")
    (tmp_path / "a.json").write_text(json.dumps({"train": {"top-k-used": 8}, "resolved": {}}))
    assert load_config_file(tmp_path / "a.yaml") == {"top_k": 8, "batch_size": 4}
    assert load_config_file(tmp_path / "a.json", section="train") == {"top_k_used": 8}
    (tmp_path / "a.toml").write_text("x = 1")
    with pytest.raises(ConfigFileError, match=r"expected a \.yaml, \.yml or \.json file"):
        load_config_file(tmp_path / "a.toml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigFileError, match="not valid JSON"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(ConfigFileError, match="no such file"):
        load_config_file(tmp_path / "missing.yaml")
