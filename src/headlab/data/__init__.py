"""Corpora, token blocks and built-in tasks, turned into :class:`headlab.batch.Batch` values."""

from headlab.data.blocks import batch_fingerprint, bos_prefix, make_blocks, token_stream
from headlab.data.corpora import BUILTIN_CORPORA, load_texts
from headlab.data.targets import target_batch
from headlab.data.tasks import TASKS, Task, load_task, ordinary_token_ids

__all__ = [
    "BUILTIN_CORPORA",
    "TASKS",
    "Task",
    "batch_fingerprint",
    "bos_prefix",
    "load_task",
    "load_texts",
    "make_blocks",
    "ordinary_token_ids",
    "target_batch",
    "token_stream",
]
