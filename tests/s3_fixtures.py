"""A real S3 server for the object-storage tests: moto in server mode on 127.0.0.1.

Everything talks HTTP to it — s3fs/zarr in the test process and the ``extract``/``heads``/
``roicache`` subprocesses alike — so the code under test runs exactly as against AWS, only the
endpoint differs.

How the endpoint reaches s3fs: botocore's ``AWS_ENDPOINT_URL_S3``, read each time a client is
made. fsspec's ``FSSPEC_S3_ENDPOINT_URL`` is read once when fsspec is imported, so setting it from
a fixture does nothing in this process (tried with s3fs 2026.9: requests went to amazonaws.com).

Fixtures:
    moto_endpoint (session): ``http://127.0.0.1:PORT`` of the running server.
    s3 (function): the environment set with monkeypatch (undone after the test) and an
        :class:`S3` helper: ``s3.bucket()`` makes a fresh bucket, ``s3.fs()`` an uncached s3fs.
    s3_module (module): the same environment for module-scoped fixtures (a store extracted once).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

FAKE_KEY, FAKE_SECRET, REGION = "testing", "testing", "us-east-1"
_BUCKETS = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_environment(endpoint: str, home: Path) -> dict[str, str]:
    """The variables a process needs to reach the moto server with fake credentials.

    ``home``: a directory without AWS files. The config/credentials file variables point into it
    so a developer's ``~/.aws`` can never leak real credentials (or a default profile) into a test,
    and the EC2 metadata lookup is off so "no credentials" fails at once instead of after a timeout.
    """
    return {
        "AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
    }


# Variables that would override the fake credentials above when set on the developer's machine.
_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL")


def apply_s3_environment(mp: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Set :func:`s3_environment` through ``mp`` (undone with it) and drop cached s3fs instances,
    which keep the credentials and endpoint they were made with."""
    import s3fs

    for name in _UNSET:
        mp.delenv(name, raising=False)
    for name, value in s3_environment(endpoint, home).items():
        mp.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()


@dataclass(frozen=True)
class S3:
    """The moto server as a test sees it."""

    endpoint: str

    def fs(self):
        """A new s3fs filesystem (no instance cache, no directory-listing cache shared with the
        code under test), so what a test deletes or reads back is what the server holds."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                 key=FAKE_KEY, secret=FAKE_SECRET, endpoint_url=self.endpoint)

    def bucket(self, stem: str = "roicache") -> str:
        """Create a bucket no other test uses; returns its name."""
        import boto3

        name = f"{stem}-{os.getpid()}-{next(_BUCKETS)}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=FAKE_KEY, aws_secret_access_key=FAKE_SECRET,
                     region_name=REGION).create_bucket(Bucket=name)
        return name

    def keys(self, url: str) -> list[str]:
        """Every object key under ``url`` (``s3://bucket/prefix``), relative to it, sorted."""
        root = url.removeprefix("s3://").rstrip("/")
        return sorted(k.removeprefix(root + "/") for k in self.fs().find(root))


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    # The server logs every request through werkzeug; a test run would print thousands of lines.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3(moto_endpoint, monkeypatch, tmp_path) -> S3:
    home = tmp_path / "aws_home"
    home.mkdir()
    apply_s3_environment(monkeypatch, moto_endpoint, home)
    return S3(moto_endpoint)


@pytest.fixture(scope="module")
def s3_module(moto_endpoint, tmp_path_factory) -> Iterator[S3]:
    home = tmp_path_factory.mktemp("aws_home")
    with pytest.MonkeyPatch.context() as mp:
        apply_s3_environment(mp, moto_endpoint, home)
        yield S3(moto_endpoint)
