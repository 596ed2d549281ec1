"""A real S3 API for the tests: moto in server mode, as a subprocess on a free port of 19100-19199,
with authentication on (requests need the access key of an IAM user the fixture creates, as on AWS).

Fixtures (import them into a test module: ``from s3server import s3, s3_store  # noqa: F401``):
    s3        session-wide server: ``.endpoint``, ``.bucket``, ``.env`` (the AWS variables a client needs)
    s3_store  a fresh ``s3://bucket/<prefix>`` URI with the AWS variables set in this process
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import pytest

from ui import browser

FIRST_PORT, LAST_PORT = 19100, 19199
BUCKET = "camscope-test"


@dataclass
class S3Server:
    """A running moto server and the credentials of its one IAM user."""

    endpoint: str
    bucket: str
    env: dict = field(default_factory=dict)

    def uri(self, prefix: str) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{prefix}"


def free_port(first: int = FIRST_PORT, last: int = LAST_PORT) -> int:
    """A free TCP port of ``first..last`` on 127.0.0.1."""
    return browser.free_port(range(first, last + 1))


def _wait_listening(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with code {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"moto server not listening on {port} after {timeout} s")


def _user_and_bucket(endpoint: str) -> dict:
    """Create an IAM user allowed everything, its access key, and the bucket (the server's first three
    requests are unauthenticated, the bucket creation already uses the new key)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="camscope")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="camscope", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="camscope")["AccessKey"]
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
    return env


@pytest.fixture(scope="session")
def s3():
    """The moto S3 server for the whole session; stopped (and its data gone) afterwards."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the tests run, and a full pipe blocks moto
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(port, process)
        yield S3Server(endpoint, BUCKET, _user_and_bucket(endpoint))
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture()
def s3_store(s3, monkeypatch, request):
    """A fresh store URI on the server, with this process's AWS variables pointing at it."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3.uri(f"{re.sub(r'[^A-Za-z0-9_-]', '-', request.node.name)[:40]}-{uuid.uuid4().hex[:8]}")
