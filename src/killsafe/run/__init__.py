"""``Run`` and the parts it is made of.

``Run`` (``facade``) holds its configuration (``config``) and delegates to
small parts, one concept each:

- ``opening``: a session opened: resume, the parts wired, records started;
- ``position``: where the loop is (steps completed, this session's start);
- ``boundary``: at each step boundary, one ``Decision`` (stop? save? why?
  under which name?) agreed through a ``Coordinator``, then acted on;
- ``stops`` and ``control``: stop requests, and the requests other
  processes drop into ``control/``;
- ``ledger``: every checkpoint written, the save in flight, the requests
  answered;
- ``resume``: which checkpoint to continue from, restored in place;
- ``tree``: what a checkpoint holds besides the tracked objects;
- ``metrics`` and ``best``: what was logged, and the best of each metric;
- ``session``: ``run.json``, ``status.json`` and its heartbeat, ``events.jsonl``;
- ``services``: history, progress, the keyboard watch, the dashboard child;
- ``ending``, ``closing`` and ``callbacks``: why the run ended, the teardown
  in its order, the summary, the report and the user's callbacks.
"""

from __future__ import annotations

from killsafe.run.facade import RESUME_ENV, Run

__all__ = ["RESUME_ENV", "Run"]
