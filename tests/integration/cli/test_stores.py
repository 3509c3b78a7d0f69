"""``ascend doctor`` and ``ascend gc`` against the object-store emulators, and what the
S3 emulator enforces of a credential scoped to one user's prefix."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

import ascend
from tests.cluster.stores import Store
from tests.integration.cli.conftest import ascend_cli

pytestmark = pytest.mark.stores


def test_doctor_checks_read_write_create_only_and_delete_on_each_store(
    cloud_store: Store, store_prefix: str
) -> None:
    ascend.configure(storage=store_prefix, storage_options=cloud_store.storage_options)
    done = ascend_cli("doctor", "--no-job")
    assert done.exit_code == 0, done.stdout
    storage = next(c for c in done.json if c["name"] == "storage")
    assert storage["ok"] is True
    assert "write, read, create-only, delete" in storage["detail"]


def _s3_client(store: Store, **credentials: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=store.storage_options["endpoint_url"],
        region_name="us-east-1",
        **credentials,
    )


def test_gc_aborts_stale_multipart_uploads_under_the_users_prefix(s3_store: Store) -> None:
    s3_store.activate()
    prefix = f"{s3_store.url}/{uuid.uuid4().hex}"
    settings = ascend.configure(storage=prefix, storage_options=s3_store.storage_options)
    bucket, _, root = settings.user_prefix.removeprefix("s3://").partition("/")
    client = _s3_client(s3_store)
    upload = client.create_multipart_upload(Bucket=bucket, Key=f"{root}/blobs/sha256/abandoned")
    elsewhere = client.create_multipart_upload(Bucket=bucket, Key="someone-else/upload")
    try:
        time.sleep(1.5)
        dry = ascend_cli("gc", "--older-than", "1s", "--dry-run")
        uploads = [r["name"] for r in dry.json if r["kind"] == "upload"]
        assert uploads == [f"s3://{bucket}/{root}/blobs/sha256/abandoned#{upload['UploadId']}"]
        done = ascend_cli("gc", "--older-than", "1s")
        assert [r["name"] for r in done.json if r["kind"] == "upload"] == uploads
        left = client.list_multipart_uploads(Bucket=bucket).get("Uploads") or []
        assert [u["UploadId"] for u in left] == [elsewhere["UploadId"]]
    finally:
        client.abort_multipart_upload(
            Bucket=bucket, Key="someone-else/upload", UploadId=elsewhere["UploadId"]
        )


def test_the_s3_emulator_enforces_a_credential_scoped_to_one_users_prefix(
    s3_store: Store,
) -> None:
    """moto evaluates IAM identity policies (not bucket policies) once its authentication
    is switched on: a user's key limited to their prefix can write there, not elsewhere."""
    import requests

    s3_store.activate()
    endpoint = s3_store.storage_options["endpoint_url"]
    bucket = s3_store.url.removeprefix("s3://").split("/")[0]
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    name = f"alice-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": f"arn:aws:s3:::{bucket}/projects/*/users/{name}/*",
            }
        ],
    }
    iam.put_user_policy(UserName=name, PolicyName="ascend", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    alice = _s3_client(
        s3_store,
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )
    previous = requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).json()
    try:
        alice.put_object(Bucket=bucket, Key=f"projects/p/users/{name}/x", Body=b"mine")
        with pytest.raises(Exception, match="AccessDenied"):
            alice.put_object(Bucket=bucket, Key="projects/p/users/bob/x", Body=b"not mine")
        with pytest.raises(Exception, match="AccessDenied"):
            alice.get_object(Bucket=bucket, Key="projects/p/users/bob/x")
    finally:
        restore = previous.get("PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT", "inf")
        requests.post(f"{endpoint}/moto-api/reset-auth", data=str(restore).encode(), timeout=10)


def test_admin_storage_create_makes_a_bucket_once(s3_store: Store) -> None:
    s3_store.activate()
    ascend.configure(storage_options=s3_store.storage_options)
    url = f"s3://made-{uuid.uuid4().hex[:8]}"
    first = ascend_cli("admin", "storage", "create", url)
    assert first.exit_code == 0, first.stderr
    assert first.json["action"] == "created"
    assert ascend_cli("admin", "storage", "create", url).json["action"] == "exists"
    assert url.removeprefix("s3://") in [
        b["Name"] for b in _s3_client(s3_store).list_buckets()["Buckets"]
    ]
