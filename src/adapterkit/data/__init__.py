"""Reading data: files, in-memory objects and built-in data sets, into ``TaskData``."""

from adapterkit.data.builtin import BUILTIN_DATASETS
from adapterkit.data.classification import (
    classification_from_table,
    classification_from_texts,
)
from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.loading import TASK_READERS, load_data, read_texts
from adapterkit.data.splits import holdout, split_indices
from adapterkit.data.tables import Table, read_table, table_from_object
from adapterkit.data.token_classification import (
    token_classification_from_table,
    token_classification_from_texts,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "TASK_READERS",
    "Table",
    "TaskData",
    "classification_from_table",
    "classification_from_texts",
    "holdout",
    "load_data",
    "read_table",
    "read_texts",
    "split_indices",
    "table_from_object",
    "token_classification_from_table",
    "token_classification_from_texts",
]
