"""TrainConfig validation (every error at once, named by flag) and --config files overridden by flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitcache.train.cli import _resolve
from logitcache.train.config import ConfigError, TrainConfig, parse_batch_size

BASE = {"cache": "c", "student": "tiny-llama", "output": "o"}


def test_all_errors_are_reported_at_once_with_flag_names() -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig(**BASE, loss="jsd", alpha=1.5, temperature=0, steps=3, epochs=1, batch_size="many", seed=-1)
    msg = str(e.value)
    for needle in (
        "`--loss jsd` without `--beta` in (0, 1)",
        "`--alpha`",
        "`--temperature`",
        "`--steps` and `--epochs`",
        "`--batch-size many`",
        "`--seed`",
    ):
        assert needle in msg


def test_beta_only_for_jsd_and_skew() -> None:
    with pytest.raises(ConfigError, match="only applies to"):
        TrainConfig(**BASE, loss="forward_kl", beta=0.5)
    assert TrainConfig(**BASE, loss="skew_kl", beta=0.1).beta == 0.1


def test_batch_size_units() -> None:
    assert parse_batch_size("8") == (8, "sequences")
    assert parse_batch_size("4096tok") == (4096, "tokens")
    cfg = TrainConfig(**BASE, batch_size="512t")
    assert (cfg.batch_count, cfg.batch_unit) == (512, "tokens")


def test_config_file_supplies_fields_and_flags_override(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("cache: from-file\nstudent: tiny-llama\noutput: out\nloss: jsd\nbeta: 0.3\nlr: 0.002\n")
    cfg = _resolve(str(f), {"lr": 0.01, "beta": None, "steps": 5})
    assert (cfg.cache, cfg.loss, cfg.beta, cfg.lr, cfg.steps) == ("from-file", "jsd", 0.3, 0.01, 5)
    g = tmp_path / "bad.json"
    g.write_text(json.dumps({**BASE, "learning_rate": 1}))
    with pytest.raises(ConfigError, match="unknown option"):
        _resolve(str(g), {})


def test_cli_reports_bad_options_without_starting() -> None:
    from logitcache.train.cli import train_student

    res = CliRunner().invoke(train_student, ["--cache", "c", "--student", "s", "--output", "o", "--loss", "skew_kl"])
    assert res.exit_code == 2
    assert "without `--beta`" in res.output
