"""megafs.crypto is pure: its public names exist, and importing it pulls in
no I/O layer (no trio, no network client, no other megafs package)."""

from __future__ import annotations

import subprocess
import sys

import megafs.crypto


def test_public_names_exist() -> None:
    for name in megafs.crypto.__all__:
        assert hasattr(megafs.crypto, name), name
    assert len(set(megafs.crypto.__all__)) == len(megafs.crypto.__all__)


def test_import_pulls_in_no_io_layers() -> None:
    code = (
        "import sys, megafs.crypto; "
        "print(' '.join(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('trio', 'httpx', 'pyfuse3', 'sqlite3', 'starlette') "
        "or (m.startswith('megafs.') and not m.startswith(('megafs.crypto', 'megafs.errors'))))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
