"""Benchmark datasets: a registry of specs, the download stage, and the folder layout that
evaluation reads (users' own data and converted benchmarks alike)."""

from fmbseg.datasets.folder import FolderDataset, Sample, folder_spec, read_mask, write_mask
from fmbseg.datasets.registry import (
    Archive,
    DatasetSpec,
    RawLayout,
    coco_stuff_stuff_names,
    get_dataset_spec,
    list_datasets,
    register_dataset,
)

__all__ = [
    "Archive",
    "DatasetSpec",
    "FolderDataset",
    "RawLayout",
    "Sample",
    "coco_stuff_stuff_names",
    "folder_spec",
    "get_dataset_spec",
    "list_datasets",
    "read_mask",
    "register_dataset",
    "write_mask",
]
