"""A directory of checkpoints: commit, list, load, verify, delete, prune, lock.

A checkpoint exists once its directory has been renamed into place; a reader
never sees a partial one. One process writes to a store at a time (an
``flock`` on ``.lock``, taken at the first mutating call); readers never lock.

Rooms: ``facade`` (``CheckpointStore``), ``catalog`` (list, resolve, load,
verify), ``commit`` (the rename commit and the sweep), ``lock``,
``naming`` and ``failures`` (a failed write as one typed line). The store
never imports the saver: ``save_async`` uses the one registered with
``register_saver``.

Example::

    store = CheckpointStore("runs/exp1/checkpoints", keep_last=3)
    store.save({"weights": weights, "epoch": 3}, step=300)
    state = store.load("latest")
"""

from killsafe.store.commit import Staging
from killsafe.store.facade import CheckpointStore, Saver, SaverFactory, register_saver
from killsafe.store.failures import free_space, io_error
from killsafe.store.naming import sanitize_name

__all__ = [
    "CheckpointStore",
    "Saver",
    "SaverFactory",
    "Staging",
    "free_space",
    "io_error",
    "register_saver",
    "sanitize_name",
]
