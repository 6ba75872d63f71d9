"""Caches on object storage, against a real S3-protocol server (moto, a subprocess; tests/s3server.py).

The writer, the lifecycle (open, complete_shards, finalize), the reader and verify run unchanged on an s3:// URL;
what is checked here is what only object storage can get wrong: an object visible before its upload completes, a
failed upload leaving part of a shard, the manifest before the shards, credentials written into the cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from logitcache.storage import (
    CachedSequence,
    CacheReader,
    CacheStore,
    ShardWriter,
    StorageLocationError,
    complete_shards,
    open_capture,
    verify_cache,
    write_cache,
)
from logitcache.storage import store as store_module
from logitcache.storage.cli import inspect_cmd, verify_cmd
from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, bucket_objects

from .conftest import header, make_sequence

VOCAB, K = 300, 8


def _sequences(n: int = 60) -> list[CachedSequence]:
    rng = np.random.default_rng(1)
    return [make_sequence(rng, i * 7, int(rng.integers(2, 40)), VOCAB, K) for i in range(n)]


def _write(path: str | Path, seqs: list[CachedSequence]) -> dict[str, Any]:
    return write_cache(path, header(VOCAB, K), seqs, row_group_bytes=4_000, shard_size_bytes=12_000)


def _assert_no_secret(objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        assert SECRET_ACCESS_KEY.encode() not in data, f"the secret key was written into {key}"
        assert ACCESS_KEY_ID.encode() not in data, f"the access key id was written into {key}"


def test_s3_cache_equals_the_local_one_and_verifies(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    seqs = _sequences()
    url = f"s3://{s3_bucket}/caches/one"
    local = _write(tmp_path / "local", seqs)
    remote = _write(url, seqs)
    assert len(remote["shards"]) > 1, "small shard size must give several shards"
    # same bytes as a local write: the shards are the writer's own files, uploaded as they are
    assert [(s["path"], s["sha256"]) for s in remote["shards"]] == [(s["path"], s["sha256"]) for s in local["shards"]]
    got = list(CacheReader(url).iter_sequences())
    want = list(CacheReader(tmp_path / "local").iter_sequences())
    assert [g.sequence_id for g in got] == [s.sequence_id for s in seqs]
    for g, w in zip(got, want):
        for name in ("input_ids", "loss_mask", "entry_ids", "entry_logprobs", "next_token_logprobs", "tail_mass"):
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name))
    assert verify_cache(url).ok
    result = CliRunner().invoke(verify_cmd, [url])
    assert result.exit_code == 0 and "all good" in result.output, result.output
    result = CliRunner().invoke(inspect_cmd, [url])
    assert result.exit_code == 0 and url in result.output, result.output
    objects = bucket_objects(s3_server.client(), s3_bucket)
    assert not [k for k in objects if k.endswith(".tmp")], "staged shards are local files, never objects"
    _assert_no_secret(objects)


def _watch_uploads(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, bucket: str) -> list[str]:
    """Records the key of every object the store creates, in the order the uploads complete, and checks, while
    each upload is still sending bytes, that the object is not visible yet (a HEAD answers 404)."""
    client = s3_server.client()
    completed: list[str] = []
    upload = store_module.CacheStore._upload

    def watched(self: CacheStore, path: Path, chunks: Any, size: int) -> None:
        key = str(path).split("/", 1)[1]

        def checked() -> Iterator[bytes]:
            for chunk in chunks:
                yield chunk
                with pytest.raises(client.exceptions.ClientError, match="404"):
                    client.head_object(Bucket=bucket, Key=key)

        upload(self, path, checked(), size)
        completed.append(key)

    monkeypatch.setattr(store_module.CacheStore, "_upload", watched)
    monkeypatch.setattr(store_module, "_CHUNK_BYTES", 2_000)  # several chunks per shard: a visible half would show
    return completed


def test_objects_appear_whole_and_the_manifest_last(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    completed = _watch_uploads(monkeypatch, s3_server, s3_bucket)
    manifest = _write(f"s3://{s3_bucket}/c", _sequences())
    assert completed[0] == "c/capture.json"  # first: from then on the prefix is recognisably a cache
    assert completed[-1] == "c/manifest.json"  # last: its presence promises every shard it lists
    shards = [f"c/{s['path']}" for s in manifest["shards"]]
    assert set(shards) <= set(completed[:-1])
    for key in shards:  # each shard before its sidecar, so a sidecar always describes a whole shard
        assert completed.index(key) < completed.index(f"{key}.json")


def test_failed_upload_leaves_no_object_and_resume_continues(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{s3_bucket}/c"
    open_capture(url, header(VOCAB, K))
    upload = store_module.CacheStore._upload
    calls = {"n": 0}

    def failing(self: CacheStore, path: Path, chunks: Any, size: int) -> None:
        calls["n"] += 1
        if calls["n"] != 3:  # the second shard's upload breaks after its first chunk (a lost connection)
            return upload(self, path, chunks, size)

        def broken() -> Iterator[bytes]:
            yield next(iter(chunks))
            raise OSError("connection reset (injected)")

        return upload(self, path, broken(), size)

    monkeypatch.setattr(store_module.CacheStore, "_upload", failing)
    monkeypatch.setattr(store_module, "_CHUNK_BYTES", 2_000)
    seqs = _sequences()
    writer = ShardWriter(url, top_k=K, vocab_size=VOCAB, row_group_bytes=4_000, shard_size_bytes=12_000)
    with pytest.raises(OSError, match="injected"), writer as w:
        for s in seqs:
            w.write(s)
    # (pyarrow leaves a `shards/` folder marker after a delete: an empty object, not a shard)
    keys = {k for k in bucket_objects(s3_server.client(), s3_bucket) if not k.endswith("/")}
    assert keys == {"c/capture.json", "c/shards/r000-000000.parquet", "c/shards/r000-000000.parquet.json"}
    (entry,) = complete_shards(url, prefix="r000")
    assert not list(CacheStore(url).staging_dir().glob("*.tmp")), "the aborted writer deletes its staged shard"
    monkeypatch.setattr(store_module.CacheStore, "_upload", upload)
    done = entry["num_sequences"]
    with ShardWriter(url, top_k=K, vocab_size=VOCAB, row_group_bytes=4_000, shard_size_bytes=12_000) as w:
        for s in seqs[done:]:
            w.write(s)
    assert sum(e["num_sequences"] for e in complete_shards(url)) == len(seqs)


def test_killed_writer_leftovers_are_removed_on_resume(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/c"
    open_capture(url, header(VOCAB, K))
    staging = CacheStore(url).staging_dir()
    (staging / "r000-000000.parquet.tmp").write_bytes(b"half a shard")  # what kill -9 leaves behind
    (staging / "r001-000000.parquet.tmp").write_bytes(b"another replica's")
    assert complete_shards(url, prefix="r000") == []
    assert sorted(p.name for p in staging.iterdir()) == ["r001-000000.parquet.tmp"]


def test_a_remote_object_that_is_not_a_whole_shard_is_dropped(s3_server: S3Server, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/c"
    _write(url, _sequences(20))
    client = s3_server.client()
    # what a failed upload whose clean-up failed too could leave: no sidecar, not a Parquet file
    client.put_object(Bucket=s3_bucket, Key="c/shards/r000-000099.parquet", Body=b"PAR1 truncated")
    names = [e["path"] for e in complete_shards(url)]
    assert "shards/r000-000099.parquet" not in names
    assert "c/shards/r000-000099.parquet" not in bucket_objects(client, s3_bucket)


def test_a_sidecar_lost_with_the_kill_is_rewritten(s3_server: S3Server, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/c"
    manifest = _write(url, _sequences(20))
    client = s3_server.client()
    first = manifest["shards"][0]
    client.delete_object(Bucket=s3_bucket, Key=f"c/{first['path']}.json")
    entries = complete_shards(url)
    assert entries[0] == first
    sidecar = client.get_object(Bucket=s3_bucket, Key=f"c/{first['path']}.json")["Body"].read()
    assert json.loads(sidecar) == first


def test_location_errors_name_the_fix(s3_bucket: str) -> None:
    with pytest.raises(StorageLocationError, match="AWS_ACCESS_KEY_ID"):
        CacheStore(f"s3://AKIAX:{SECRET_ACCESS_KEY}@{s3_bucket}/c")
    with pytest.raises(StorageLocationError, match="bucket 'no-such-bucket' does not exist"):
        open_capture("s3://no-such-bucket/c", header(VOCAB, K))


def test_an_unreachable_endpoint_names_the_variables(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageLocationError, match="cannot reach the bucket .* check AWS_ENDPOINT_URL"):
        open_capture(f"s3://{s3_bucket}/c", header(VOCAB, K))


def test_endpoint_comes_from_the_environment(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)  # the service-specific one wins, as in the SDKs
    _write(f"s3://{s3_bucket}/c", _sequences(5))
    assert CacheReader(f"s3://{s3_bucket}/c").manifest["totals"]["num_sequences"] == 5


def test_a_multipart_upload_is_invisible_until_it_completes(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # 24 MiB in 8 MiB pieces: pyarrow sends parts of a multipart upload as the bytes come (not one PUT at close)
    completed = _watch_uploads(monkeypatch, s3_server, s3_bucket)
    monkeypatch.setattr(store_module, "_CHUNK_BYTES", 8 << 20)
    client = s3_server.client()
    seen_in_progress = []
    upload = store_module.CacheStore._upload

    def spying(self: CacheStore, path: Path, chunks: Any, size: int) -> None:
        def spied() -> Iterator[bytes]:
            for chunk in chunks:
                yield chunk
                seen_in_progress.append(len(client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])))

        upload(self, path, spied(), size)

    monkeypatch.setattr(store_module.CacheStore, "_upload", spying)
    staged = tmp_path / "big.bin"
    staged.write_bytes(np.random.default_rng(0).bytes(24 << 20))
    store = CacheStore(f"s3://{s3_bucket}/c")
    store.publish(staged, store.layout.shards_dir / "r000-000000.parquet")
    assert completed == ["c/shards/r000-000000.parquet"] and not staged.exists()
    assert max(seen_in_progress) == 1, "no multipart upload was in flight: the test did not test it"
    head = client.head_object(Bucket=s3_bucket, Key="c/shards/r000-000000.parquet")
    assert head["ContentLength"] == 24 << 20


def test_file_urls_are_local_directories_and_other_schemes_are_refused_for_writing(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/c"
    _write(url, _sequences(5))  # through the local rename path: pyarrow's local stream shows a file as it grows
    assert (tmp_path / "c" / "manifest.json").is_file()
    assert CacheReader(url).manifest["totals"]["num_sequences"] == 5
    with pytest.raises(StorageLocationError, match="local directories and s3:// only"):
        open_capture("gs://some-bucket/c", header(VOCAB, K))
