"""Demo cohort, IXI naming/demographics, and IngestConfig validation."""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xlwt  # writes Excel 97 workbooks, the format of IXI.xls (test extra)

from mrigen.data.config import IngestConfig
from mrigen.data.demo import DemoSubject, _subject_volume, make_demo_cohort
from mrigen.data.ixi import (DEMOGRAPHIC_COLUMNS, discover, find_demographics, ixi_name, parse_ixi_name,
                             read_demographics)


def test_demo_cohort_layout_and_determinism(demo_cohort_src, tmp_path):
    files = sorted(demo_cohort_src.glob("*.nii.gz"))
    parsed = [parse_ixi_name(f) for f in files]
    assert len(files) == 6 and all(p is not None and p.modality == "T1" for p in parsed)
    assert {p.site for p in parsed} == {"Guys", "HH", "IOP"}
    img = nib.load(files[0])
    assert img.get_data_dtype() == np.int16 and nib.aff2axcodes(img.affine) == ("P", "S", "R")
    table = pd.read_csv(demo_cohort_src / "IXI.csv")
    assert tuple(table.columns) == DEMOGRAPHIC_COLUMNS and set(table.IXI_ID) == {p.ixi_id for p in parsed}
    again = make_demo_cohort(tmp_path / "b", subjects=6, seed=3, voxel_scale=4, progress=False, workers=1)
    for a, b in zip(files, again):
        assert a.name == b.name
        np.testing.assert_array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))
    other = make_demo_cohort(tmp_path / "c", subjects=1, seed=4, voxel_scale=4, progress=False)
    assert other[0].name not in {f.name for f in files} or not np.array_equal(
        np.asanyarray(nib.load(other[0]).dataobj), np.asanyarray(nib.load(files[0]).dataobj))


def test_demo_cohort_threads_write_the_same_files_and_bad_workers_fail(demo_cohort_src, tmp_path):
    """The fixture's cohort was written by one thread per CPU; three threads (native BLAS pools limited to one
    thread) and one thread (pools left alone) give the same voxels, and the pools' sizes are restored."""
    from threadpoolctl import threadpool_info

    before = [p["num_threads"] for p in threadpool_info()]
    threaded = make_demo_cohort(tmp_path / "t", subjects=6, seed=3, voxel_scale=4, progress=False, workers=3)
    assert [p["num_threads"] for p in threadpool_info()] == before
    single = make_demo_cohort(tmp_path / "s", subjects=6, seed=3, voxel_scale=4, progress=False, workers=1)
    for a, b, c in zip(sorted(demo_cohort_src.glob("*.nii.gz")), threaded, single, strict=True):
        assert a.name == b.name == c.name
        np.testing.assert_array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))
        np.testing.assert_array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(c).dataobj))
    with pytest.raises(ValueError, match="workers=-1 is invalid"):
        make_demo_cohort(tmp_path / "bad", subjects=1, voxel_scale=4, progress=False, workers=-1)


def test_t2_is_axial_with_inverted_contrast(tmp_path):
    t2 = nib.load(make_demo_cohort(tmp_path, subjects=1, modality="T2", voxel_scale=4, progress=False)[0])
    assert nib.aff2axcodes(t2.affine) == ("L", "A", "S") and t2.shape == (64, 64, 32)


def test_ventricles_grow_with_age():
    young = DemoSubject(ixi_id=50, site="Guys", scan=1, age=22.0, sex_id=1)  # the reference scanner look
    old = dataclasses.replace(young, age=85.0)
    dark = []
    for subject in (young, old):
        img = nib.as_closest_canonical(_subject_volume(subject, "T1", 2, 0))
        data = np.asanyarray(img.dataobj).astype(float)
        i, j, k = np.rint(np.linalg.solve(img.affine, [0.0, -8.0, 15.0, 1.0])[:3]).astype(int)  # ventricles
        r = np.rint(np.array([22.0, 40.0, 18.0]) / img.header.get_zooms()[:3]).astype(int)  # lateral ventricles
        box = data[i - r[0]:i + r[0], j - r[1]:j + r[1], k - r[2]:k + r[2]]
        dark.append(int((box < 0.4 * np.percentile(data, 99.5)).sum()))  # CSF-dark voxels
    assert dark[1] > 1.15 * dark[0]


def test_ixi_names():
    assert ixi_name(2, "Guys", 828, "T1") == "IXI002-Guys-0828-T1.nii.gz"
    p = parse_ixi_name(Path("IXI012-HH-1211-T2.nii.gz"))
    assert p is not None and (p.subject, p.site, p.modality) == ("IXI012", "HH", "T2")
    for bad in ("IXI012-XX-1211-T1.nii.gz", "ixi012-HH-1211-T1.nii.gz", "IXI012-HH-1211-T1.nii.bz2"):
        assert parse_ixi_name(Path(bad)) is None
    with pytest.raises(ValueError, match="site='Mars'"):
        ixi_name(1, "Mars", 1, "T1")
    with pytest.raises(ValueError, match="modality='CT'"):
        ixi_name(1, "HH", 1, "CT")


def test_discover_reports_unmatched(tmp_path):
    for name in ("IXI002-Guys-0828-T1.nii.gz", "IXI002-Guys-0828-T2.nii.gz", "brain.nii.gz", "IXI.csv"):
        (tmp_path / name).write_bytes(b"x")
    files, unmatched = discover(tmp_path, "T1")
    assert [f.path.name for f in files] == ["IXI002-Guys-0828-T1.nii.gz"]
    assert [u.name for u in unmatched] == ["brain.nii.gz"]
    with pytest.raises(ValueError, match="not a directory"):
        discover(tmp_path / "nope", "T1")


def test_demographics_duplicates_conflicts_and_zero_missing(tmp_path):
    rows = [
        {"IXI_ID": 2, "SEX_ID": 1, "AGE": 35.8},
        {"IXI_ID": 2, "SEX_ID": 1, "AGE": 35.8},  # duplicate, consistent
        {"IXI_ID": 12, "SEX_ID": 2, "AGE": 38.78},
        {"IXI_ID": 12, "SEX_ID": 1, "AGE": 41.0},  # conflicting sex and age
        {"IXI_ID": 13, "SEX_ID": 0, "AGE": 0},  # 0 = missing
        {"IXI_ID": 0, "SEX_ID": 1, "AGE": 50},  # not a subject
        {"IXI_ID": "abc", "SEX_ID": 1, "AGE": 50},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "IXI.csv", index=False)
    demo = read_demographics(tmp_path / "IXI.csv")
    assert demo.age == {2: 35.8} and demo.sex == {2: "M"}
    text = "\n".join(demo.dropped)
    assert "IXI_ID 2: 2 rows, merged" in text and "IXI_ID 12: conflicting AGE" in text and "SEX_ID" in text
    assert "row 7" in text and "row 8" in text
    (tmp_path / "bad.csv").write_text("A,B\n1,2\n")
    with pytest.raises(ValueError, match="no IXI_ID column"):
        read_demographics(tmp_path / "bad.csv")


def _write_xls(path: Path, rows: list[tuple]) -> None:
    """An Excel 97 (BIFF8) workbook laid out like IXI.xls: one sheet, IXI's header row, dates as date cells."""
    book = xlwt.Workbook()
    sheet = book.add_sheet("Table")
    date = xlwt.easyxf(num_format_str="YYYY-MM-DD")
    for j, name in enumerate(DEMOGRAPHIC_COLUMNS):
        sheet.write(0, j, name)
    for i, row in enumerate(rows, start=1):
        for j, value in enumerate(row):
            if value is None:
                continue  # a blank cell, as in IXI.xls
            sheet.write(i, j, value, date) if isinstance(value, datetime.date) else sheet.write(i, j, value)
    book.save(str(path))


def test_demographics_from_an_ixi_xls_workbook(tmp_path):
    d = datetime.date
    _write_xls(tmp_path / "IXI.xls", [
        # IXI_ID SEX HEIGHT WEIGHT ETHNIC MARITAL OCCUP QUALIF DOB DATE_AVAILABLE STUDY_DATE AGE
        (2, 2, 164, 58, 1, 4, 1, 5, d(1970, 1, 30), 1, d(2005, 11, 18), 35.8),
        (12, 1, 175, 70, 1, 2, 1, 5, d(1966, 8, 20), 1, d(2005, 6, 1), 38.78),
        (12, 1, 175, 70, 1, 2, 1, 5, d(1966, 8, 20), 1, d(2005, 6, 1), 38.78),  # duplicate row, consistent
        (13, 1, 0, 0, 0, 0, 0, 0, None, 0, None, None),  # IXI's 0 / blank = missing
        (None, 1, 170, 60, 1, 1, 1, 1, None, 1, None, 40.0),  # no id
    ])
    assert find_demographics(tmp_path) == tmp_path / "IXI.xls"
    demo = read_demographics(tmp_path / "IXI.xls")
    assert demo.age == {2: 35.8, 12: 38.78} and demo.sex == {2: "F", 12: "M", 13: "M"}
    text = "\n".join(demo.dropped)
    assert "IXI_ID 12: 2 rows, merged" in text and "row 6" in text
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "IXI.xls").write_bytes(b"\xd0\xcf\x11\xe0 not a workbook")
    with pytest.raises(ValueError, match=r"demographics .*IXI.xls: cannot read"):
        read_demographics(tmp_path / "bad" / "IXI.xls")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.75, 0.9])
def test_a_truncated_workbook_is_a_clear_error(tmp_path, keep):
    """Truncations make calamine report an error or panic in its Rust code (0.75 panics with calamine 0.37)."""
    _write_xls(tmp_path / "full.xls", [(2, 2, 164, 58, 1, 4, 1, 5, datetime.date(1970, 1, 30), 1,
                                        datetime.date(2005, 11, 18), 35.8)])
    raw = (tmp_path / "full.xls").read_bytes()
    (tmp_path / "IXI.xls").write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ValueError, match=r"demographics .*IXI.xls: cannot read \(") as err:
        read_demographics(tmp_path / "IXI.xls")
    assert "\n" not in str(err.value)


def test_a_reader_that_kills_its_process_is_a_clear_error(tmp_path, monkeypatch):
    """A damaged workbook made calamine abort its process (a 450 GB allocation): the parse runs in a child. The
    child is killed here (SIGKILL, as the OOM killer would) to stand in for that file."""
    _write_xls(tmp_path / "IXI.xls", [(2, 2, 164, 58, 1, 4, 1, 5, None, 1, None, 35.8)])
    monkeypatch.setattr(pd, "read_excel", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))  # forked
    with pytest.raises(ValueError, match="IXI.xls: cannot read .*process died"):
        read_demographics(tmp_path / "IXI.xls")


def test_config_defaults_and_round_trip():
    cfg = IngestConfig()
    assert cfg.band == (0.35, 0.50) and cfg.slices == 30 and cfg.size == 128 and cfg.n_workers >= 1
    assert IngestConfig.from_dict(cfg.content_dict()) == dataclasses.replace(cfg, workers=0)
    assert "workers" not in cfg.content_dict()
    with pytest.raises(ValueError, match="unknown key.*bogus"):
        IngestConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(("field", "value"), [
    ("modality", "MRA"), ("size", 100), ("slices", 0), ("band", (0.5, 0.4)), ("min_brain", 1.0),
    ("foreground", 0.0), ("percentiles", (99.0, 1.0)), ("split", (0.5, 0.1, 0.1)), ("split", (0.0, 0.5, 0.5)),
    ("seed", 1.5), ("workers", -1), ("max_voxels", 10),
])
def test_invalid_config_names_field_and_allowed(field, value):
    with pytest.raises(ValueError, match=rf"IngestConfig\.{field}=.*allowed"):
        IngestConfig(**{field: value})
