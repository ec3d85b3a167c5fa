"""The local side of the drive: chunk cache, per-file content, journal and
uploader. Holds ciphertext only on disk."""

from megafs.cache.chunks import ChunkCache
from megafs.cache.content import FileContent, Sealer
from megafs.cache.readahead import ReadAhead, Reader
from megafs.cache.service import Held
from megafs.cache.state import JournalEntry, LocalState
from megafs.cache.uploader import Uploader, UploaderStats

__all__ = [
    "ChunkCache",
    "FileContent",
    "Held",
    "JournalEntry",
    "LocalState",
    "ReadAhead",
    "Reader",
    "Sealer",
    "Uploader",
    "UploaderStats",
]
