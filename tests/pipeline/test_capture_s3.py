"""`cache-teacher --output s3://...` killed with SIGKILL and resumed, then verified and trained from, against a real
S3-protocol server (moto, a subprocess; tests/s3server.py), the HF backend and the tiny demo teacher."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from logitcache.storage import CacheReader
from tests.pipeline.test_capture import SETTINGS, assert_same_content, capture_command, capture_reference
from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, bucket_objects

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _check_visible_shards(objects: dict[str, bytes]) -> int:
    """Every shard object visible is a whole Parquet file, equal to what its sidecar (when there) describes;
    returns how many there are."""
    import hashlib

    shards = {k: v for k, v in objects.items() if k.endswith(".parquet")}
    for key, data in shards.items():
        pq.read_table(io.BytesIO(data))  # a truncated file has no footer: this raises
        sidecar = objects.get(f"{key}.json")
        if sidecar is not None:
            entry = json.loads(sidecar)
            assert entry["num_bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest(), key
    return len(shards)


def _kill_after_first_shard(cmd: list[str], client: Any, bucket: str) -> None:
    """Starts the capture and SIGKILLs it once a shard object appears, checking what is visible after the kill."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        listing = client.list_objects_v2(Bucket=bucket, Prefix="cache/shards/").get("Contents", [])
        if any(o["Key"].endswith(".parquet") for o in listing):
            break
        time.sleep(0.05)
    time.sleep(0.2)  # into the next shard's rows
    if proc.poll() is not None:
        _, err = proc.communicate()
        pytest.fail(f"the capture finished before it could be killed: {err.decode()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    objects = bucket_objects(client, bucket)
    assert "cache/manifest.json" not in objects, "a killed capture must not have written the manifest"
    assert _check_visible_shards(objects) >= 1


@pytest.fixture(scope="module")
def local_reference(tiny_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted local capture with the same settings."""
    return capture_reference(tiny_demo_dir, tmp_path_factory.mktemp("ref") / "cache")


def test_s3_capture_killed_resumed_verified_and_trained_from(
    tiny_demo_dir: Path, local_reference: Path, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    client = s3_server.client()
    url = f"s3://{s3_bucket}/cache"
    cmd = capture_command(tiny_demo_dir / "teacher", tiny_demo_dir / "data" / "train.jsonl", Path(url), SETTINGS)
    cmd[cmd.index("--output") + 1] = url  # str(Path("s3://b/c")) would be "s3:/b/c"
    _kill_after_first_shard(cmd, client, s3_bucket)

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert url in done.stderr  # the CLI names the cache by its URL
    assert_same_content(url, local_reference)  # type: ignore[arg-type]  # CacheReader takes URLs too
    manifest = CacheReader(url).manifest
    assert manifest["replicas"][0]["resumed_sequences"] > 0  # the last run really resumed
    objects = bucket_objects(client, s3_bucket)
    assert _check_visible_shards(objects) == len(manifest["shards"])
    assert "cache/tokenizer/tokenizer.json" in objects  # the cache is self-contained on object storage too
    records = [json.loads(line) for line in objects["cache/logs/capture-r000.jsonl"].decode().splitlines()]
    assert len({r["time"] for r in records}) == len(records) > 1  # batches of the killed and the resumed run

    verify = subprocess.run([str(BIN / "logitcache"), "verify", url], env=_env(), capture_output=True, text=True)
    assert verify.returncode == 0 and "all good" in verify.stdout, verify.stderr[-2000:]

    run = tmp_path / "run"
    train_cmd = [str(BIN / "logitcache"), "train-student", "--cache", url, "--student", "tiny-llama"]
    train_cmd += ["--steps", "4", "--batch-size", "4", "--save-every", "0", "--eval-fraction", "0.25"]
    train_cmd += ["--output", str(run), "--no-progress"]
    trained = subprocess.run(train_cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run / "final" / "model.safetensors").is_file()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 4
    assert any("eval" in r for r in rows)  # the held-out part streamed from the bucket too
    # the student loaded the cache's own tokenizer copy, downloaded from the bucket
    assert list(Path(os.environ["TMPDIR"]).glob("logitcache-staging/*/copies/tokenizer-*/tokenizer.json"))

    texts = [*objects.values(), done.stderr.encode(), trained.stderr.encode(), (run / "config.json").read_bytes()]
    for data in texts:
        assert SECRET_ACCESS_KEY.encode() not in data and ACCESS_KEY_ID.encode() not in data
