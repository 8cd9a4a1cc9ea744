"""The cache contract: store layout, metadata records, create/open, readers, validation, export.

Imports no other roicache package. See ``docs/cache.md`` for the on-disk layout.
"""

from cache_schema.differences import meta_differences
from cache_schema.hdf5 import export_hdf5
from cache_schema.layout import ArraySpec, classes_layout, roi_arrays, split_layout
from cache_schema.meta import (
    SCHEMA_VERSION,
    DatasetInfo,
    DetectorInfo,
    ExtractionSettings,
    GtTable,
    SplitSource,
    SplitSpec,
    StoreMeta,
)
from cache_schema.postprocess import BoxRegression, Postprocess
from cache_schema.records import ROI_COLUMNS, ClassInfo, RoiSet
from cache_schema.split import SplitStore
from cache_schema.store import Store, create_store, finalize, open_for_resume, open_store
from cache_schema.summary import SplitSummary, StoreSummary, inspect_store
from cache_schema.validate import ValidationReport, validate_store

__all__ = [
    "SCHEMA_VERSION",
    "ROI_COLUMNS",
    "ArraySpec",
    "ClassInfo",
    "DatasetInfo",
    "BoxRegression",
    "DetectorInfo",
    "Postprocess",
    "ExtractionSettings",
    "GtTable",
    "RoiSet",
    "SplitSource",
    "SplitSpec",
    "SplitStore",
    "SplitSummary",
    "Store",
    "StoreMeta",
    "StoreSummary",
    "ValidationReport",
    "classes_layout",
    "create_store",
    "export_hdf5",
    "finalize",
    "inspect_store",
    "meta_differences",
    "open_for_resume",
    "open_store",
    "roi_arrays",
    "split_layout",
    "validate_store",
]
