"""IXI naming and demographics: which files belong to whom, and what we know about each subject.

IXI volumes are named ``IXI<id>-<site>-<nnnn>-<modality>.nii.gz`` (sites Guys, HH, IOP). The demographics
table (``IXI.xls`` from the IXI site, or a CSV with the same columns) has one row per subject but, in the real
release, some IDs appear twice with consistent or conflicting values, and 0 means "missing" in every column.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = [
    "SITES",
    "MODALITIES",
    "DEMOGRAPHIC_COLUMNS",
    "IXIFile",
    "Demographics",
    "parse_ixi_name",
    "ixi_name",
    "discover",
    "read_demographics",
    "find_demographics",
]

SITES = ("Guys", "HH", "IOP")
MODALITIES = ("T1", "T2", "PD", "MRA", "DTI")
DEMOGRAPHIC_COLUMNS = (
    "IXI_ID", "SEX_ID", "HEIGHT", "WEIGHT", "ETHNIC_ID", "MARITAL_ID", "OCCUPATION_ID",
    "QUALIFICATION_ID", "DOB", "DATE_AVAILABLE", "STUDY_DATE", "AGE",
)
_NAME = re.compile(
    r"^IXI(?P<id>\d{1,4})-(?P<site>Guys|HH|IOP)-(?P<scan>\d{4})-(?P<mod>T1|T2|PD|MRA|DTI)(?:-\d+)?\.nii(?:\.gz)?$"
)


@dataclass(frozen=True)
class IXIFile:
    """One IXI volume file, identified by its name."""

    path: Path  # the file
    ixi_id: int  # numeric IXI subject id (IXI002 -> 2)
    site: str  # "Guys" | "HH" | "IOP"
    scan: str  # 4-digit scan number from the name
    modality: str  # "T1" | "T2" | "PD" | "MRA" | "DTI"

    @property
    def subject(self) -> str:
        """Subject label as IXI writes it, e.g. ``"IXI002"``."""
        return f"IXI{self.ixi_id:03d}"


@dataclass(frozen=True)
class Demographics:
    """Per-subject demographics after cleaning, plus what was dropped and why."""

    age: dict[int, float]  # IXI_ID -> age in years (missing ids absent)
    sex: dict[int, str]  # IXI_ID -> "M" | "F" (SEX_ID 1 = male, 2 = female)
    dropped: tuple[str, ...]  # one human-readable line per dropped row or field


def parse_ixi_name(path: Path) -> IXIFile | None:
    """Parse an IXI file name; return None when the name does not follow the IXI pattern."""
    m = _NAME.match(path.name)
    if m is None:
        return None
    return IXIFile(path, int(m["id"]), m["site"], m["scan"], m["mod"])


def ixi_name(ixi_id: int, site: str, scan: int, modality: str) -> str:
    """The IXI file name for a subject, e.g. ``ixi_name(2, "Guys", 828, "T1") == "IXI002-Guys-0828-T1.nii.gz"``."""
    if site not in SITES:
        raise ValueError(f"site={site!r} is not an IXI site (allowed: {', '.join(SITES)})")
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r} is not an IXI modality (allowed: {', '.join(MODALITIES)})")
    return f"IXI{ixi_id:03d}-{site}-{scan:04d}-{modality}.nii.gz"


def discover(directory: Path, modality: str) -> tuple[list[IXIFile], list[Path]]:
    """Find the volumes of one modality in ``directory`` (not recursive).

    Returns:
        ``(files, unmatched)``: IXI files of ``modality`` sorted by name, and every other ``*.nii``/``*.nii.gz``
        file whose name does not follow the IXI pattern (other modalities are neither).
    """
    if not directory.is_dir():
        raise ValueError(f"--ixi {directory}: not a directory")
    files, unmatched = [], []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
            continue
        parsed = parse_ixi_name(path)
        if parsed is None:
            unmatched.append(path)
        elif parsed.modality == modality:
            files.append(parsed)
    return files, unmatched


def find_demographics(directory: Path) -> Path | None:
    """The demographics table in ``directory``: ``IXI.xls``, else ``IXI.csv``, else None."""
    for name in ("IXI.xls", "IXI.xlsx", "IXI.csv"):
        if (directory / name).is_file():
            return directory / name
    return None


def _clean(value: object) -> float | None:
    """A numeric cell with IXI's conventions: blank, non-numeric and 0 are missing."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if (math.isnan(x) or x == 0) else x


def _excel_table(path: str) -> pd.DataFrame:
    """Child process: parse a workbook with calamine; every failure comes back as a ValueError.

    The child's stderr goes to /dev/null: a Rust panic prints its own multi-line report there, and the panic's
    message comes back in the ValueError anyway."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        return pd.read_excel(path, engine="calamine")  # IXI.xls (Excel 97, BIFF8) and .xlsx alike
    except BaseException as exc:  # noqa: BLE001 -- incl. pyo3's PanicException (a BaseException) from Rust code
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def _read_excel_isolated(path: Path) -> pd.DataFrame:
    """Parse a workbook in a child process: a damaged file can make the Rust reader panic or abort the process
    (e.g. a huge allocation), and that must become a clear error, not the end of the ingest."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context(method)) as pool:
        try:
            return pool.submit(_excel_table, str(path)).result()
        except BrokenProcessPool as exc:
            raise ValueError("the Excel reader process died on it: a damaged workbook") from exc


def read_demographics(path: Path) -> Demographics:
    """Read IXI.xls or a CSV with IXI's columns and reconcile duplicate IDs.

    Rules: rows without a valid IXI_ID are dropped; 0 or blank means missing; an ID listed several times keeps
    each field whose non-missing values agree (ages within 0.1 year) and sets a conflicting field to missing.
    Every dropped row or field is reported in ``Demographics.dropped``.

    Raises:
        ValueError: if the file cannot be read or lacks the IXI_ID column.
    """
    try:
        if path.suffix.lower() in (".xls", ".xlsx"):
            table = _read_excel_isolated(path)
        else:
            table = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ValueError(f"demographics {path}: cannot read ({exc})") from exc
    table.columns = [str(c).strip().upper() for c in table.columns]
    if "IXI_ID" not in table.columns:
        raise ValueError(f"demographics {path}: no IXI_ID column (columns: {', '.join(table.columns)})")
    dropped: list[str] = []
    rows: dict[int, list[tuple[float | None, float | None]]] = {}
    for i, rec in enumerate(table.to_dict("records"), start=2):  # row 1 is the header line
        ixi_id = _clean(rec.get("IXI_ID"))
        if ixi_id is None or ixi_id != int(ixi_id) or ixi_id < 0:
            dropped.append(f"row {i}: IXI_ID {rec.get('IXI_ID')!r} is not a subject id, row dropped")
            continue
        rows.setdefault(int(ixi_id), []).append((_clean(rec.get("AGE")), _clean(rec.get("SEX_ID"))))
    age: dict[int, float] = {}
    sex: dict[int, str] = {}
    for ixi_id, recs in sorted(rows.items()):
        if len(recs) > 1:
            dropped.append(f"IXI_ID {ixi_id}: {len(recs)} rows, merged into one")
        ages = sorted({round(a, 2) for a, _ in recs if a is not None and a > 0})
        if ages and ages[-1] - ages[0] <= 0.1:
            age[ixi_id] = ages[0]
        elif ages:
            dropped.append(f"IXI_ID {ixi_id}: conflicting AGE {ages}, set to missing")
        sexes = {s for _, s in recs if s is not None}
        if len(sexes) == 1 and sexes <= {1.0, 2.0}:
            sex[ixi_id] = "M" if sexes == {1.0} else "F"
        elif sexes:
            dropped.append(f"IXI_ID {ixi_id}: SEX_ID {sorted(sexes)} is conflicting or not 1/2, set to missing")
    return Demographics(age=age, sex=sex, dropped=tuple(dropped))
