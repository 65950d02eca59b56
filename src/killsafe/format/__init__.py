"""One checkpoint on disk: encode a state tree, write it, read it back, verify it.

A checkpoint directory holds ``manifest.json`` (the tree as JSON, metadata,
sizes and xxh3 checksums) and ``tensors.safetensors`` (every tensor, array
and large bytes value, in the safetensors layout so that
``safetensors.safe_open`` reads the weights without killsafe). See
docs/format.md for the full description.

The package's rooms, lowest first: ``io`` (untrusted files read safely,
buffers written fast), ``manifest`` (constants, schema, checksum, reading
it), ``codec`` (tree <-> JSON nodes and tensor entries), ``tensorfile``
(safetensors layout, xxh3, zstd), ``pieces`` (incremental checkpoints:
content-addressed pieces shared by a store) and ``checkpoint`` (a directory written,
read and verified). Format knows nothing of the store or the medium: the
medium may hand ``write_encoded`` a faster way to write (``fast_write``).
Reading never executes code: the manifest is JSON, tensor bytes are raw bytes.
"""

from killsafe.format.checkpoint import (
    ManifestFields,
    check_files,
    export_tensors,
    read_tree,
    verify_checkpoint,
    write_checkpoint,
    write_encoded,
    write_incremental,
)
from killsafe.format.codec import (
    Encoded,
    TensorEntry,
    clean_json,
    encode,
    float_value,
    int_value,
)
from killsafe.format.io import FastWrite
from killsafe.format.manifest import (
    CHECKSUM_FIELD,
    FORMAT_NAME,
    FORMAT_NAMES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PIECES_LAYOUT,
    SHARDED_LAYOUT,
    TENSOR_FILE,
    TENSOR_FILE_ZSTD,
    CheckpointInfo,
    SchemaError,
    check_schema,
    checkpoint_nbytes,
    is_sharded,
    manifest_digest,
    read_manifest,
    read_manifest_sized,
    shares_pieces,
)
from killsafe.format.pieces import (
    PIECE_SUFFIX,
    PIECE_TMP_PREFIX,
    PIECES_DIR,
    is_pieces,
    piece_header,
    piece_key,
    piece_nbytes,
    piece_path,
)
from killsafe.format.pieces import (
    present as piece_present,
)
from killsafe.format.tensorfile import ZSTD_LEVEL

__all__ = [
    "CHECKSUM_FIELD",
    "FORMAT_NAME",
    "FORMAT_NAMES",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "PIECES_DIR",
    "PIECES_LAYOUT",
    "PIECE_SUFFIX",
    "PIECE_TMP_PREFIX",
    "SHARDED_LAYOUT",
    "TENSOR_FILE",
    "TENSOR_FILE_ZSTD",
    "ZSTD_LEVEL",
    "CheckpointInfo",
    "Encoded",
    "FastWrite",
    "ManifestFields",
    "SchemaError",
    "TensorEntry",
    "check_files",
    "check_schema",
    "checkpoint_nbytes",
    "clean_json",
    "encode",
    "export_tensors",
    "float_value",
    "int_value",
    "is_pieces",
    "is_sharded",
    "manifest_digest",
    "piece_header",
    "piece_key",
    "piece_nbytes",
    "piece_path",
    "piece_present",
    "read_manifest",
    "read_manifest_sized",
    "read_tree",
    "shares_pieces",
    "verify_checkpoint",
    "write_checkpoint",
    "write_encoded",
    "write_incremental",
]
