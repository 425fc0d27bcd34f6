"""Reliability scenario 6: a bad NIfTI corpus, and changed sources caught by the store's sha256 manifest.

Every bad-input kind of the data tests, fuzzed headers, mutated gzip streams and random bytes are each ingested
as one file beside one good file: ingest must not raise, the good file is always used, and the other file is
either used (finite slices in [0, 1]) or skipped with exactly one warning line ``skipped NAME: reason``. Counts
of what was run and what held go to ``tests/reliability/.results/data-<case>.json`` (read by
docs/RELIABILITY.md). Re-ingesting over a store, and ``python -m mrigen.data verify``, name every source
whose bytes differ from the store's manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrigen.data.__main__ import main as data_cli
from mrigen.data.config import IngestConfig
from mrigen.data.ingest import ingest
from mrigen.data.store import SliceStore
from mrigen.data.verify import verify_sources

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]  # a hang fails the test instead of CI

CFG = IngestConfig(size=16, slices=4, workers=1)
RESULTS = Path(__file__).parent / ".results"
GOOD = "IXI001-Guys-0001-T1.nii.gz"  # the good file every case is ingested beside
BAD = "IXI002-HH-0002-T1.nii"  # + ".gz" for gzip payloads
SHAPE = (16, 16, 12)  # small valid volume: 16x16x12 int16, 12 mm voxels (a ~190 mm head)
SETTINGS = settings(derandomize=True, database=None, deadline=10_000, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _image(seed: int = 0, bump: float = 0.0) -> nib.Nifti1Image:
    """A head-like ellipsoid with a little noise; ``bump`` adds to a central block (a changed voxel region)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    head = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.9) ** 2 <= 1.0
    data = np.where(head, 600.0 + 200.0 * z, 0.0) + rng.normal(0.0, 5.0, SHAPE)
    data[6:10, 6:10, 4:8] += bump
    affine = np.diag([12.0, 12.0, 12.0, 1.0])
    affine[:3, 3] = -np.array(SHAPE) * 6.0
    return nib.Nifti1Image(np.rint(data).astype(np.int16), affine)


NII = _image().to_bytes()  # single-file .nii bytes: 352-byte header + extension flag + voxels
NII_GZ = gzip.compress(NII, mtime=0)


class Tally:
    """What happened over one property's examples; written as JSON even when the test fails."""

    def __init__(self, case: str) -> None:
        self.case = case
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.max_seconds = 0.0

    def save(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        body = {"case": self.case, "examples": self.counts["examples"], "ingested": self.counts["ingested"],
                "skipped": self.counts["skipped"],
                "ingested_with_changed_bytes": self.counts["ingested_changed"], "crashes": self.counts["crashes"],
                "source_changes_caught": self.counts["caught"], "max_seconds_per_example": round(self.max_seconds, 3),
                "skip_reasons": dict(self.reasons.most_common())}
        tmp = RESULTS / f".data-{self.case}.json.tmp"
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, RESULTS / f"data-{self.case}.json")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _reason_kind(reason: str) -> str:
    """'truncated gzip stream (ends after 1,234 bytes)' -> 'truncated gzip stream': a countable class."""
    words = []
    for word in reason.replace(":", " ").split():
        if word[0] in "([{'\"" or word.startswith("b'"):
            break
        word = "#" if any(c.isdigit() for c in word) and not word.isalpha() else word
        if not (word == "#" and words and words[-1] == "#"):
            words.append(word)
    return " ".join(words)


def _rows_of(store: SliceStore, name: str) -> np.ndarray:
    """(n, H, W) float32: the store's slices that came from source ``name``."""
    rows = [store.images(split)[i] for split in store.splits
            for i, meta in enumerate(store.slices(split)) if meta["source"] == name]
    return np.asarray(rows, dtype=np.float32)


def check_one(payload: bytes, name: str, tally: Tally, base: SliceStore | None = None) -> str | None:
    """Ingest ``payload`` as ``name`` beside the good file, assert the scenario's invariants.

    Returns:
        The skip reason, or None when the file was ingested.
    """
    reason = None
    tally.counts["examples"] += 1
    work = Path(tempfile.mkdtemp(prefix="rel6-"))
    handler = _Lines()
    logger = logging.getLogger("mrigen.data")
    logger.addHandler(handler)
    t0 = time.perf_counter()
    try:
        ixi = work / "ixi"
        ixi.mkdir()
        (ixi / GOOD).write_bytes(NII_GZ)
        (ixi / name).write_bytes(payload)
        try:
            store = ingest(ixi, work / "store", CFG, progress=False)
        except Exception:
            tally.counts["crashes"] += 1
            raise
        used = {s["file"]: s["sha256"] for s in store.manifest["sources"]}
        skipped = {s["file"]: s for s in store.manifest["report"]["skipped"]}
        assert GOOD in used
        assert (name in used) != (name in skipped), "the file must be used or skipped, exactly once"
        sha = hashlib.sha256(payload).hexdigest()
        if name in used:
            tally.counts["ingested"] += 1
            assert used[name] == sha
            if base is not None and payload != NII_GZ:  # changed bytes that decode: the CRC-32 held, same voxels
                tally.counts["ingested_changed"] += 1
                np.testing.assert_array_equal(_rows_of(store, name), _rows_of(base, name))
        else:
            tally.counts["skipped"] += 1
            reason = skipped[name]["reason"]
            assert reason and "\n" not in reason
            assert skipped[name]["sha256"] in (sha, None)
            assert handler.lines.count(f"skipped {name}: {reason}") == 1
            tally.reasons[_reason_kind(reason)] += 1
        for split in store.splits:
            rows = store.images(split).astype(np.float32)
            assert np.isfinite(rows).all() and rows.min() >= 0.0 and rows.max() <= 1.0
        if base is not None:
            changes = verify_sources(ixi, base)
            expect = payload != NII_GZ
            assert (name in changes.changed) == expect, f"{name} changed={expect} but verify says {changes}"
            tally.counts["caught"] += expect
    finally:
        tally.max_seconds = max(tally.max_seconds, time.perf_counter() - t0)
        logger.removeHandler(handler)
        shutil.rmtree(work)
    return reason


# ---- every bad-input kind of the data tests (tests/data/test_validate.py BAD), on the small volume ----

def _data_bad_kinds() -> list[tuple[Any, str]]:
    spec = importlib.util.spec_from_file_location(
        "_mrigen_data_bad_kinds", Path(__file__).parents[1] / "data" / "test_validate.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.BAD


def test_every_bad_input_kind_is_skipped_with_its_reason(tmp_path):
    tally = Tally("bad-kinds")
    try:
        for make, reason in _data_bad_kinds():
            scratch = Path(tempfile.mkdtemp(dir=tmp_path))
            path = make(scratch, _image())
            name = BAD + (".gz" if path.name.endswith(".gz") else "")
            got = check_one(path.read_bytes(), name, tally)
            assert got is not None and reason in got, f"{make.__name__}: expected {reason!r}, got {got!r}"
    finally:
        tally.save()


# ---- what the fuzzing found, pinned as plain regression cases ----

def _with_fields(**fields: Any) -> bytes:
    block = np.frombuffer(NII[:348], dtype=nib.nifti1.header_dtype.newbyteorder("<")).copy()
    for key, value in fields.items():
        block[key] = value
    return gzip.compress(block.tobytes() + NII[348:], mtime=0)


FOUND = [  # (payload, reason) -- each crashed ingest or was ingested with wrong voxels before the fix
    (_with_fields(vox_offset=-np.inf), "invalid NIfTI header"),  # nibabel check: int(-inf), OverflowError
    (_with_fields(vox_offset=np.nan), "vox_offset nan outside"),  # int(nan) in read_volume: ValueError
    (_with_fields(scl_slope=1.0, scl_inter=np.nan), "invalid intensity scaling"),  # nibabel HeaderDataError
    (NII_GZ[:363] + bytes([NII_GZ[363] ^ 0x10]) + NII_GZ[364:],  # one flipped bit in the deflate data: decoded
     "corrupt gzip data"),  # to wrong voxels without a zlib error (so did 93 of 460 such flips); the CRC-32 shows it
    (NII_GZ[:-8], "truncated gzip stream"),  # trailer missing: was accepted
    (NII_GZ + b"junk", "corrupt gzip data"),  # trailing garbage after the stream
]


@pytest.mark.parametrize(("payload", "reason"), FOUND, ids=["inf-offset", "nan-offset", "nan-inter", "flipped-bit",
                                                            "no-trailer", "trailing-junk"])
def test_fuzz_findings_are_skipped_with_a_reason(payload, reason):
    got = check_one(payload, BAD + ".gz", Tally("regressions"))
    assert got is not None and got.startswith(reason), got


@pytest.mark.parametrize("payload", [NII_GZ + bytes(512), gzip.compress(NII[:1000]) + gzip.compress(NII[1000:])],
                         ids=["nul-padding", "two-members"])
def test_valid_gzip_variants_still_ingest(payload):
    assert check_one(payload, BAD + ".gz", Tally("regressions")) is None


# ---- fuzzed header fields of a valid volume ----

_F32 = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"),
                                  float("-inf"), 12.0, 0.004, 60.0]),
                 st.floats(width=32, allow_nan=True, allow_infinity=True))
_I16 = st.one_of(st.sampled_from([-32768, -1, 0, 1, 2, 3, 4, 7, 8, 12, 16, 17, 255, 32767]),
                 st.integers(-32768, 32767))
_CODES = st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2304]),
                   st.integers(-32768, 32767))  # NIfTI datatype codes, then anything
_FIELDS = {
    "dim": st.lists(_I16, min_size=8, max_size=8),
    "datatype": _CODES,
    "bitpix": _I16,
    "pixdim": st.lists(_F32, min_size=8, max_size=8),
    "vox_offset": st.one_of(st.sampled_from([0.0, 348.0, 352.0, 353.0, 1e9, -352.0]), _F32),
    "sform_code": _I16,
    "qform_code": _I16,
    "srow_x": st.lists(_F32, min_size=4, max_size=4),
    "srow_y": st.lists(_F32, min_size=4, max_size=4),
    "srow_z": st.lists(_F32, min_size=4, max_size=4),
    "quatern_b": _F32, "quatern_c": _F32, "quatern_d": _F32, "qoffset_x": _F32,
    "scl_slope": _F32,
    "scl_inter": _F32,
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"", b"\xff\xfe\x00"]),
    "sizeof_hdr": st.sampled_from([348, 540, 0, -348, 1 << 24]),
    "xyzt_units": st.integers(0, 255),
    "intent_code": _I16,
}


@st.composite
def fuzzed_headers(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid small volume with 1-4 header fields replaced, optionally big-endian and/or raw header bytes flipped."""
    big = draw(st.booleans())
    dtype = nib.nifti1.header_dtype.newbyteorder(">" if big else "<")
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(NII))
    block = np.frombuffer(hdr.binaryblock, dtype=nib.nifti1.header_dtype.newbyteorder(hdr.endianness)).astype(dtype)
    for field in draw(st.lists(st.sampled_from(sorted(_FIELDS)), min_size=1, max_size=4, unique=True)):
        block[field] = draw(_FIELDS[field])
    raw = bytearray(block.tobytes())
    for pos, value in draw(st.lists(st.tuples(st.integers(0, 347), st.integers(0, 255)), max_size=3)):
        raw[pos] = value
    payload = bytes(raw) + NII[348:]
    if draw(st.booleans()):
        return gzip.compress(payload, mtime=0), BAD + ".gz"
    return payload, BAD


def test_fuzzed_headers_never_crash_or_hang():
    tally = Tally("fuzzed-headers")

    @settings(SETTINGS, max_examples=400)
    @given(case=fuzzed_headers())
    def run(case: tuple[bytes, str]) -> None:
        check_one(case[0], case[1], tally)

    try:
        run()
    finally:
        tally.save()


# ---- byte flips, truncations, insertions and deletions in the gzip stream ----

_OPS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(NII_GZ) - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(NII_GZ) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(NII_GZ)), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, len(NII_GZ) - 1), st.integers(1, 64)),
)


def _mutate(raw: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
    out = bytearray(raw)
    for op, pos, arg in ops:
        pos = min(pos, len(out))
        if op == "flip" and pos < len(out):
            out[pos] ^= arg
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = arg
        elif op == "delete":
            del out[pos:pos + arg]
    return bytes(out)


def test_mutated_gzip_streams_never_crash_and_changes_are_caught(tmp_path):
    tally = Tally("gzip-mutations")
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / GOOD).write_bytes(NII_GZ)
    (base_dir / (BAD + ".gz")).write_bytes(NII_GZ)
    base = ingest(base_dir, tmp_path / "base-store", CFG, progress=False)  # the store made from the originals

    @settings(SETTINGS, max_examples=300)
    @given(ops=st.lists(_OPS, min_size=1, max_size=4))
    def run(ops: list[tuple[str, int, Any]]) -> None:
        check_one(_mutate(NII_GZ, ops), BAD + ".gz", tally, base)

    try:
        run()
    finally:
        tally.save()


# ---- random bytes, bare or behind a gzip magic / a valid header prefix ----

@st.composite
def random_files(draw: st.DrawFn) -> tuple[bytes, str]:
    prefix = draw(st.sampled_from([b"", b"\x1f\x8b", b"\x1f\x8b\x08\x00", NII[:348], NII[:352]]))
    body = draw(st.binary(max_size=4096))
    payload = prefix + body
    if draw(st.booleans()):
        payload = gzip.compress(payload, mtime=0)
    return payload, BAD + draw(st.sampled_from(["", ".gz"]))


def test_random_bytes_never_crash_or_hang():
    tally = Tally("random-bytes")

    @settings(SETTINGS, max_examples=200)
    @given(case=random_files())
    def run(case: tuple[bytes, str]) -> None:
        check_one(case[0], case[1], tally)

    try:
        run()
    finally:
        tally.save()


# ---- changed sources vs the store's sha256 manifest: re-ingest and `verify` ----

COHORT = ["IXI011-Guys-0011-T1.nii.gz", "IXI012-HH-0012-T1.nii.gz", "IXI013-IOP-0013-T1.nii.gz"]


def _cohort(root: Path) -> Path:
    ixi = root / "ixi"
    ixi.mkdir()
    for seed, name in enumerate(COHORT):
        (ixi / name).write_bytes(gzip.compress(_image(seed).to_bytes(), mtime=0))
    (ixi / "IXI.csv").write_text("IXI_ID,SEX_ID,AGE\n11,1,30.5\n12,2,41.0\n13,1,52.2\n")
    return ixi


def _verify_cli(ixi: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = data_cli(["verify", "--ixi", str(ixi), "--store", str(store)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _edit(ixi: Path, how: str) -> str:
    """Change the cohort in one of the ways a source can drift; returns the name that must be reported."""
    name = COHORT[1]
    if how == "voxels":  # a re-exported volume with a block of voxels altered
        (ixi / name).write_bytes(gzip.compress(_image(1, bump=40.0).to_bytes(), mtime=0))
    elif how == "recompressed":  # the same header and voxels, other gzip bytes
        (ixi / name).write_bytes(gzip.compress(_image(1).to_bytes(), compresslevel=1, mtime=0))
    elif how == "gzip-header-flip":  # a flipped mtime byte in the gzip header: decodes cleanly, CRC-32 still fine
        raw = bytearray((ixi / name).read_bytes())
        raw[4] ^= 0x5A
        (ixi / name).write_bytes(bytes(raw))
    elif how == "demographics":
        name = "IXI.csv"
        (ixi / name).write_text("IXI_ID,SEX_ID,AGE\n11,1,30.5\n12,2,42.0\n13,1,52.2\n")
    return name


@pytest.mark.parametrize("how", ["voxels", "recompressed", "gzip-header-flip", "demographics"])
def test_changed_source_is_named_on_reingest_and_by_verify(how, tmp_path, capsys, caplog):
    ixi = _cohort(tmp_path)
    out = tmp_path / "store"
    first = ingest(ixi, out, CFG, progress=False)
    assert first.manifest["report"]["source_changes"] is None  # nothing to compare with
    assert _verify_cli(ixi, out, capsys)[0] == 0

    name = _edit(ixi, how)
    code, stdout, stderr = _verify_cli(ixi, out, capsys)
    assert code == 1 and stdout.splitlines() == [f"changed: {name}"]
    assert f"1 changed ({name}), 0 added, 0 removed, 3 unchanged" in stderr

    with pytest.raises(FileExistsError, match="verify --ixi"):  # refused without --overwrite, store untouched
        ingest(ixi, out, CFG, progress=False)
    assert SliceStore.open(out).digest == first.digest

    with caplog.at_level(logging.WARNING, logger="mrigen.data"):
        second = ingest(ixi, out, CFG, overwrite=True, progress=True)
    report = second.manifest["report"]["source_changes"]
    assert report == {"changed": [name], "added": [], "removed": [], "unchanged": 3, "previous_store": first.digest}
    assert f"source changed since the existing store {out}: {name}" in caplog.messages
    assert f"sources vs the replaced store: 1 changed ({name})" in capsys.readouterr().err  # the summary line
    same_voxels = how in ("recompressed", "gzip-header-flip", "demographics")
    assert (second.digest == first.digest) == same_voxels  # same decoded voxels -> byte-identical slices
    assert (first.manifest["slices"]["age"] != second.manifest["slices"]["age"]) == (how == "demographics")
    assert _verify_cli(ixi, out, capsys)[0] == 0  # the new store vouches for the new bytes


def test_added_and_removed_sources_are_named(tmp_path, capsys):
    ixi = _cohort(tmp_path)
    out = tmp_path / "store"
    ingest(ixi, out, CFG, progress=False)
    (ixi / COHORT[0]).unlink()
    (ixi / "IXI014-HH-0014-T1.nii.gz").write_bytes(NII_GZ)
    (ixi / "IXI015-HH-0015-T2.nii.gz").write_bytes(NII_GZ)  # another modality: not a source of a T1 store
    code, stdout, _ = _verify_cli(ixi, out, capsys)
    assert code == 1 and stdout.splitlines() == ["added: IXI014-HH-0014-T1.nii.gz", f"removed: {COHORT[0]}"]
    report = ingest(ixi, out, CFG, overwrite=True, progress=False).manifest["report"]["source_changes"]
    assert (report["added"], report["removed"], report["changed"]) == (["IXI014-HH-0014-T1.nii.gz"], [COHORT[0]], [])


def test_verify_refuses_a_tampered_store_and_a_missing_folder(tmp_path, capsys):
    ixi = _cohort(tmp_path)
    out = tmp_path / "store"
    ingest(ixi, out, CFG, progress=False)
    code, _, stderr = _verify_cli(tmp_path / "nope", out, capsys)
    assert code == 1 and "not a directory" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sources"][0]["sha256"] = "0" * 64  # a hand-edited manifest cannot vouch for anything
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, stderr = _verify_cli(ixi, out, capsys)
    assert code == 1 and "manifest_sha256" in stderr


def test_qform_quaternion_that_nibabel_rejects_is_skipped_with_a_reason(tmp_path, caplog):
    """Found by hypothesis in CI: quatern_b = 1e30 makes nibabel's get_qform raise ValueError (w2 < 0)."""
    import nibabel as nib
    import numpy as np

    from mrigen.data.validate import VolumeError, read_volume

    img = nib.Nifti1Image(np.ones((12, 12, 10), np.int16), np.eye(4))
    img.header.set_qform(np.eye(4), code=1)
    img.header.set_sform(None, code=0)
    path = tmp_path / "IXI002-HH-0002-T1.nii"
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    raw[256:260] = np.float32(1e30).astype("<f4").tobytes()          # quatern_b (NIfTI-1 header offset 256)
    path.write_bytes(bytes(raw))
    with pytest.raises(VolumeError, match="invalid orientation"):
        read_volume(path, 1 << 27)
