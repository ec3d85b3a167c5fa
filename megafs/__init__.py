"""megafs: an end-to-end encrypted cloud drive, mounted as an ordinary folder.

Layers (each may import only the ones to its right):

    cli -> fs -> cache -> remote -> wire
                       -> crypto
    server -> wire

``errors`` and ``wire`` are shared by every layer. The server never imports
``crypto``: it only ever sees ciphertext.
"""

__version__ = "0.1.0"
