"""TrainConfig validation (every error at once, named by flag) and --config files overridden by flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitcache.train.cli import _resolve
from logitcache.train.config import TARGET_MODES, ConfigError, EvalSettings, TrainConfig, parse_batch_size

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


def test_target_modes_are_storages() -> None:
    from logitcache.storage import targets

    assert TARGET_MODES == targets.TARGET_MODES


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "tvd", "skew_kl"])
def test_a_sampled_cache_refuses_every_loss_but_forward_kl_and_says_why(loss: str) -> None:
    beta = 0.5 if loss in ("jsd", "skew_kl") else None
    cfg = TrainConfig(**BASE, loss=loss, beta=beta)
    (msg,) = cfg.cache_problems("sampled", 12, "runs/c")
    assert f"`--loss {loss}`" in msg and "targets mode 'sampled'" in msg and "runs/c" in msg
    assert "teacher's probability of the student's own tokens" in msg and "`--loss forward_kl`" in msg
    assert cfg.cache_problems("topk", 12, "runs/c") == cfg.cache_problems("adaptive", 12, "runs/c") == []


def test_a_sampled_cache_refuses_temperature_top_k_used_and_no_tail_all_at_once() -> None:
    cfg = TrainConfig(**BASE, temperature=2.0, top_k_used=4, no_tail=True, alpha=0.5)
    problems = cfg.cache_problems("sampled", 12, "c")
    assert len(problems) == 3
    assert "`--temperature 2.0`" in problems[0] and "drawn from the teacher at T=1" in problems[0]
    assert "`--top-k-used 4`" in problems[1] and "no tail bucket" in problems[1]
    assert "`--no-tail`" in problems[2]
    assert TrainConfig(**BASE, alpha=0.5).cache_problems("sampled", 12, "c") == []  # forward KL mixed with CE
    assert "exceeds the cache's top_k 3" in TrainConfig(**BASE, top_k_used=4).cache_problems("topk", 3, "c")[0]
    kd = TrainConfig(**BASE, alpha=0.5).kd_settings("sampled")
    assert (kd.target_mode, kd.sampled, kd.alpha) == ("sampled", True, 0.5)


def test_grouped_settings_are_built_from_the_options() -> None:
    cfg = TrainConfig(**BASE, loss="jsd", beta=0.3, kd_chunk_size=64, batch_size="512tok", eval_max_sequences=5)
    kd = cfg.kd_settings("adaptive")
    assert (kd.loss, kd.beta, kd.chunk_size, kd.target_mode) == ("jsd", 0.3, 64, "adaptive")
    assert cfg.eval_settings() == EvalSettings(cfg.eval_fraction, batch_count=512, batch_unit="tokens", max_sequences=5)
