"""Checkpoints on a medium: commit, list, load, verify, delete, prune, lock.

In a local directory a checkpoint exists once its directory has been
renamed into place; on an object store (or ``memory://``), once its
manifest, written last and create-only, is there. A reader never sees a
partial one. One process writes to a store at a time (an ``flock`` on
``.lock`` locally, a lease on object stores, taken at the first mutating
call); readers never lock.

Rooms: ``facade`` (``CheckpointStore``), ``medium`` (the parts for a path or
a URL), ``catalog`` and ``keyed_catalog`` (list, resolve, load, verify),
``commit`` (the rename commit) and ``manifest_commit`` (the manifest-last
commit), ``lock`` and ``lease_lock``, ``transfer`` (``import_from``),
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
