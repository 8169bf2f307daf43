"""Prepared-data access: open a dataset folder, stream resumable training batches, read validation batches."""

from engram_train.data.manifest import DataError, Dataset, open_dataset

__all__ = ["DataError", "Dataset", "open_dataset"]
