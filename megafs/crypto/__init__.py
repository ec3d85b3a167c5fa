"""Everything megafs encrypts: one envelope (:mod:`.aead`), account and
password keys (:mod:`.keys`), content chunks (:mod:`.chunks`), node records
and manifests (:mod:`.records`). Pure functions: no I/O, no trio. The byte
layouts are normative in docs/format.md."""

from megafs.crypto.aead import OVERHEAD, seal, unseal
from megafs.crypto.chunks import CHUNK_SIZE, SealedChunk, open_chunk, seal_chunk
from megafs.crypto.keys import (
    DEFAULT_KDF,
    MIN_KDF,
    AccountKeys,
    KdfParams,
    PasswordKeys,
    derive_password_keys,
    new_kdf_params,
    new_key,
    new_node_id,
    unwrap_master_key,
    wrap_master_key,
)
from megafs.crypto.records import (
    MAX_INLINE,
    NO_PARENT,
    Kind,
    Manifest,
    NodeRecord,
    open_manifest,
    open_record,
    seal_manifest,
    seal_record,
)

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_KDF",
    "MAX_INLINE",
    "MIN_KDF",
    "NO_PARENT",
    "OVERHEAD",
    "AccountKeys",
    "KdfParams",
    "Kind",
    "Manifest",
    "NodeRecord",
    "PasswordKeys",
    "SealedChunk",
    "derive_password_keys",
    "new_kdf_params",
    "new_key",
    "new_node_id",
    "open_chunk",
    "open_manifest",
    "open_record",
    "seal",
    "seal_chunk",
    "seal_manifest",
    "seal_record",
    "unseal",
    "unwrap_master_key",
    "wrap_master_key",
]
