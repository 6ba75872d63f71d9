"""A real S3-protocol server for tests: moto's server mode started as a subprocess (no mocks in the tested code).

The code under test reaches it only through the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
as it would reach AWS or MinIO.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO, Any

# Made up for the test session, and random, so that finding it in a cache or a log can only mean it was written.
ACCESS_KEY_ID = f"AKIATEST{secrets.token_hex(6).upper()}"
SECRET_ACCESS_KEY = f"logitcache-test-secret-{secrets.token_hex(12)}"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto server: its endpoint and the environment that points the AWS SDKs at it."""

    process: subprocess.Popen[bytes]
    endpoint: str
    log: IO[bytes]  # the server's output

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata credential lookup
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_s3_server(timeout_s: float = 60.0) -> S3Server | str:
    """Starts `python -m moto.server` on a free port and waits until it answers; the reason as a str if it can't."""
    try:
        import boto3  # noqa: F401  (the tests create buckets with it)
        import moto.server  # noqa: F401
    except ImportError as e:
        return f"moto[server] and boto3 are needed for the S3 tests ({e}); pip install 'logitcache[dev]'"
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # stderr to a file, not a pipe: the server logs every request, and a pipe nobody reads fills up and hangs it
    log = tempfile.TemporaryFile()  # noqa: SIM115  (it lives as long as the server; S3Server.stop closes it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")[-500:]
            log.close()
            return f"the moto server exited with {proc.returncode}: {output}"
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return S3Server(proc, endpoint, log)
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    log.close()
    return f"the moto server did not answer on {endpoint} within {timeout_s:.0f} s"


def bucket_objects(client: Any, bucket: str) -> dict[str, bytes]:
    """Every object of `bucket`: key -> bytes."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out
