"""Download and unpack an IXI tarball (resumable, verified before extraction) and the demographics table."""

from __future__ import annotations

import hashlib
import http.client
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

__all__ = ["IXI_URLS", "IXI_DEMOGRAPHICS_URL", "FetchError", "download", "verify_tar", "fetch_ixi"]

_BASE = "https://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI"
IXI_URLS = {m: f"{_BASE}/IXI-{m}.tar" for m in ("T1", "T2", "PD", "MRA", "DTI")}
IXI_DEMOGRAPHICS_URL = f"{_BASE}/IXI.xls"
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download that failed, is incomplete, or an archive that is not a complete tar file."""


def _check_url(url: str) -> None:
    if urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"url={url!r} is invalid (allowed: http:// or https:// URLs)")


def download(url: str, dest: Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if present (HTTP Range), then rename to ``dest``.

    The byte count is checked against the server's Content-Length / Content-Range before the rename; an
    interrupted download leaves ``dest.part`` for the next call to resume.

    Raises:
        FetchError: on HTTP errors or an incomplete transfer.
    """
    _check_url(url)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: the part file is already complete
            part.rename(dest)
            return dest
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise FetchError(f"{url}: {exc.reason}") from exc
    with response:
        if response.status == 206:
            crange = response.headers.get("Content-Range", "")
            if not crange.startswith(f"bytes {have}-"):
                raise FetchError(f"{url}: server resumed at the wrong offset ({crange!r}, wanted {have})")
            total = int(crange.rsplit("/", 1)[1]) if not crange.endswith("/*") else None
            mode = "ab"
        else:  # 200: the server ignored the range, start over
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress)
        with open(part, mode) as f, bar:
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, OSError) as exc:
                raise FetchError(f"{url}: transfer interrupted after {f.tell():,} bytes ({type(exc).__name__}); "
                                 "run again to resume") from exc
    size = part.stat().st_size
    if total is not None and size != total:
        raise FetchError(f"{url}: incomplete download ({size:,} of {total:,} bytes); run again to resume")
    part.rename(dest)
    return dest


def verify_tar(path: Path, sha256: str | None = None) -> int:
    """Check that ``path`` is a complete, readable tar archive (and matches ``sha256`` if given).

    Reads every member header and checks that every member's data lies inside the file.

    Returns:
        the number of regular files in the archive.

    Raises:
        FetchError: if the archive is truncated, unreadable or has the wrong digest.
    """
    if sha256 is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        if h.hexdigest() != sha256:
            raise FetchError(f"{path.name}: sha256 {h.hexdigest()} does not match the expected {sha256}")
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError) as exc:
        raise FetchError(f"{path.name}: not a complete tar archive ({exc})") from exc
    for m in members:
        if m.isfile() and m.offset_data + m.size > size:
            raise FetchError(f"{path.name}: truncated inside {m.name} ({size:,} bytes on disk)")
    return sum(m.isfile() for m in members)


def fetch_ixi(out: Path | str, modality: str = "T1", url: str | None = None,
              demographics_url: str | None = IXI_DEMOGRAPHICS_URL, sha256: str | None = None,
              keep_archive: bool = False, progress: bool = True) -> list[Path]:
    """Download, verify and extract the IXI tarball of ``modality`` into ``out``.

    Args:
        out: directory for the volumes (created); the archive is downloaded there as ``IXI-<mod>.tar``.
        modality: "T1" | "T2" | "PD" | "MRA" | "DTI".
        url: tarball URL (default: the IXI site's URL for the modality).
        demographics_url: IXI.xls URL, or None to skip the demographics table.
        sha256: expected archive digest, checked before extraction when given.
        keep_archive: keep the .tar after a successful extraction.

    Returns:
        The extracted files, sorted.
    """
    if modality not in IXI_URLS:
        raise ValueError(f"modality={modality!r} is invalid (allowed: {', '.join(IXI_URLS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    archive = download(url or IXI_URLS[modality], out / f"IXI-{modality}.tar", progress)
    verify_tar(archive, sha256)
    with tarfile.open(archive, "r:") as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        for member in tqdm(tar.getmembers(), desc="extract", unit="entry", disable=not progress):
            tar.extract(member, out, filter="data")  # "data" filter: no absolute paths, links out, devices
    if not keep_archive:
        archive.unlink()
    if demographics_url is not None:
        download(demographics_url, out / "IXI.xls", progress)
    if progress:
        print(f"fetch-ixi: {len(names)} {modality} files extracted into {out}")
    return sorted(out / n for n in names)
