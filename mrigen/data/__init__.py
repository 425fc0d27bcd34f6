"""IXI data pipeline: naming + demographics, demo cohort, validation, ingest, slice store, download.

    python -m mrigen.data demo --out DIR          # generated IXI-like cohort (no download)
    python -m mrigen.data ingest --ixi DIR --out STORE
    python -m mrigen.data verify --ixi DIR --store STORE   # sources still match the store's sha256 manifest?
    python -m mrigen.data fetch-ixi --out DIR     # the real IXI tarball

Training code uses :class:`SliceStore` (``SliceStore.open(path)``) and :func:`build_demo_store`.
"""

from mrigen.data.build import DEMO_SUBJECTS, build_demo_store
from mrigen.data.config import IngestConfig
from mrigen.data.demo import make_demo_cohort
from mrigen.data.fetch import FetchError, fetch_ixi
from mrigen.data.ingest import IngestError, ingest
from mrigen.data.store import SliceStore, StoreError
from mrigen.data.verify import SourceChanges, verify_sources

__all__ = [
    "IngestConfig", "SliceStore", "StoreError", "IngestError", "FetchError",
    "ingest", "make_demo_cohort", "build_demo_store", "DEMO_SUBJECTS", "fetch_ixi", "SourceChanges", "verify_sources",
]
