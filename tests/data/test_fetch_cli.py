"""fetch-ixi against a loopback HTTP server (resume, truncation, verification) and the CLI entry points."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mrigen.data.__main__ import main
from mrigen.data.fetch import FetchError, download, fetch_ixi, verify_tar


def _tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            payload = bytes([i]) * 50_000
            info = tarfile.TarInfo(f"IXI00{i + 2}-HH-000{i}-T1.nii.gz")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


class _Server:
    """Serves one tarball with HTTP Range support; ``cut`` makes the next response stop early."""

    def __init__(self, body: bytes) -> None:
        self.body, self.cut, self.ranges = body, None, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path == "/IXI.xls":
                    self.send_response(404)
                    self.end_headers()
                    return
                start, rng = 0, self.headers.get("Range")
                server.ranges.append(rng)
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.body) - 1}/{len(server.body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(server.body) - start))
                self.end_headers()
                end = len(server.body) if server.cut is None else server.cut
                server.cut = None
                self.wfile.write(server.body[start:end])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server(_tarball())
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_fetch_downloads_verifies_and_extracts(server, tmp_path):
    files = fetch_ixi(tmp_path, "T1", url=f"{server.url}/IXI-T1.tar", demographics_url=None, progress=False)
    assert [f.name for f in files] == ["IXI002-HH-0000-T1.nii.gz", "IXI003-HH-0001-T1.nii.gz",
                                       "IXI004-HH-0002-T1.nii.gz"]
    assert files[1].read_bytes() == bytes([1]) * 50_000
    assert not (tmp_path / "IXI-T1.tar").exists()


def test_interrupted_download_resumes(server, tmp_path):
    server.cut = 40_000
    with pytest.raises(FetchError, match="run again to resume"):
        download(f"{server.url}/IXI-T1.tar", tmp_path / "IXI-T1.tar", progress=False)
    part = tmp_path / "IXI-T1.tar.part"
    assert part.stat().st_size == 40_000 and not (tmp_path / "IXI-T1.tar").exists()
    fetch_ixi(tmp_path, "T1", url=f"{server.url}/IXI-T1.tar", demographics_url=None, progress=False)
    assert server.ranges[-1] == "bytes=40000-"
    assert (tmp_path / "IXI004-HH-0002-T1.nii.gz").read_bytes() == bytes([2]) * 50_000


def test_incomplete_archive_is_not_extracted(server, tmp_path):
    (tmp_path / "IXI-T1.tar").write_bytes(server.body[: len(server.body) // 2])
    with pytest.raises(FetchError, match="truncated|not a complete tar"):
        fetch_ixi(tmp_path, "T1", url=f"{server.url}/IXI-T1.tar", demographics_url=None, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IXI-T1.tar"]
    with pytest.raises(FetchError, match="sha256"):
        (tmp_path / "ok.tar").write_bytes(server.body)
        verify_tar(tmp_path / "ok.tar", sha256="0" * 64)


def test_fetch_errors(server, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404"):
        download(f"{server.url}/IXI.xls", tmp_path / "IXI.xls", progress=False)
    with pytest.raises(ValueError, match="url='ftp://x/IXI-T1.tar'"):
        download("ftp://x/IXI-T1.tar", tmp_path / "a.tar", progress=False)
    with pytest.raises(ValueError, match="modality='CT'"):
        fetch_ixi(tmp_path, "CT", progress=False)


def test_cli_demo_ingest_and_errors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "ixi"), "--subjects", "3", "--voxel-scale", "4"]) == 0
    store = tmp_path / "store"
    assert main(["ingest", "--ixi", str(tmp_path / "ixi"), "--out", str(store), "--size", "16",
                 "--workers", "1"]) == 0
    assert "ingest: 3 T1 volumes" in capsys.readouterr().err
    assert main(["ingest", "--ixi", str(tmp_path / "ixi"), "--out", str(store), "--size", "16"]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["ingest", "--ixi", str(tmp_path / "empty"), "--out", str(tmp_path / "s2")]) == 1
    assert "error: no T1 volume" in capsys.readouterr().err
    assert main(["ingest", "--ixi", str(tmp_path / "ixi"), "--out", str(tmp_path / "s3"), "--split", "1", "1",
                 "0"]) == 1
    assert "IngestConfig.split" in capsys.readouterr().err


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "mrigen.data", "ingest", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--ixi" in out and "--workers" in out
