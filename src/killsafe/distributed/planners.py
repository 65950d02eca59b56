"""Non-tensor values as JSON, never pickled: the codec and DCP planners that use it.

DCP's default planners ``torch.save`` every value that is not a tensor and
``torch.load`` it back with ``weights_only=False``, which runs code from the
checkpoint. These planners store such values with killsafe's tree codec
(JSON nodes, with large bytes and arrays base64-encoded) instead.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import xxhash
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import (
    ReadItem,
    SavePlan,
    WriteItem,
    WriteItemType,
)

from killsafe.errors import (
    CorruptCheckpoint,
    UnsupportedState,
)
from killsafe.format.codec import Decoder, encode

__all__ = ["JsonLoadPlanner", "JsonSavePlanner", "decode_value", "encode_value"]


def encode_value(value: Any, fqn: str) -> bytes:
    """A non-tensor state value as JSON bytes (our tree codec); refuses what it cannot store."""
    try:
        encoded = encode(value, copy=False)
    except UnsupportedState as exc:
        raise UnsupportedState(f"in {fqn!r}: {exc}") from exc
    entries = {e.key: base64.b64encode(e.data).decode("ascii") for e in encoded.entries}
    return json.dumps({"tree": encoded.tree, "entries": entries}, allow_nan=False).encode()


def decode_value(data: bytes, fqn: str, where: Path | str) -> Any:
    """The value ``encode_value`` stored; ``CorruptCheckpoint`` when it is malformed."""
    try:
        document = json.loads(data)
        buffers = {}
        for key, text in document["entries"].items():
            raw = bytearray(base64.b64decode(text, validate=True))
            buffers[key] = (raw, 0, len(raw))
        return Decoder(where, buffers).decode(document["tree"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise CorruptCheckpoint(
            f"checkpoint {where}: the value of {fqn!r} is malformed ({exc}); "
            "restore from another checkpoint"
        ) from exc


class JsonSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, with non-tensor values encoded as JSON, not pickled.

    Every value is encoded while planning, so a value that cannot be stored
    fails the save on every rank before anything is written. DCP stores a
    key once for all ranks, so a value that differs between ranks is
    refused rather than silently kept from one rank only.
    """

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self._payloads = {
            item.index.fqn: encode_value(self.lookup_object(item.index), item.index.fqn)
            for item in plan.items
            if item.type == WriteItemType.BYTE_IO
        }
        digests = {fqn: xxhash.xxh3_64_hexdigest(p) for fqn, p in self._payloads.items()}
        # the digests ride along to the coordinator, which compares them
        return dataclasses.replace(plan, planner_data=(plan.planner_data, digests))

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        _refuse_values_that_differ([plan.planner_data[1] for plan in all_plans])
        plans = [dataclasses.replace(p, planner_data=p.planner_data[0]) for p in all_plans]
        return super().create_global_plan(plans)

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type != WriteItemType.BYTE_IO:
            return object
        payload = self._payloads.get(write_item.index.fqn)
        if payload is None:
            payload = encode_value(object, write_item.index.fqn)
        return io.BytesIO(payload)


def _refuse_values_that_differ(digests_by_rank: list[dict[str, str]]) -> None:
    first_seen: dict[str, tuple[int, str]] = {}
    for rank, digests in enumerate(digests_by_rank):
        for fqn, digest in digests.items():
            other_rank, other = first_seen.setdefault(fqn, (rank, digest))
            if other != digest:
                raise UnsupportedState(
                    f"{fqn!r} differs between rank {other_rank} and rank {rank}, and a key is "
                    "saved once for all ranks; give per-rank values a key of their own "
                    f"(for example {fqn + '.rank' + str(rank)!r})"
                )


class JsonLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values as JSON (never unpickling)."""

    where: Path | str = Path(".")  # the checkpoint, for messages (a URL in an object store)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = decode_value(value.getvalue(), fqn, self.where)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
