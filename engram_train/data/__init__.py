"""Prepared data: open a dataset folder, stream resumable training batches, read validation batches.

``data_pipelines.prepare`` writes the folder; ``loader`` explains how exact multi-worker resume works.
"""

from engram_train.data.loader import LoaderState, TrainLoader, ValLoader, build_train_loader, build_val_loader
from engram_train.data.manifest import DataError, Dataset, open_dataset

__all__ = [
    "DataError",
    "Dataset",
    "LoaderState",
    "TrainLoader",
    "ValLoader",
    "build_train_loader",
    "build_val_loader",
    "open_dataset",
]
