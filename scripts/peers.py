"""The benchmarks' one way to import flash_nsa (a peer, never a dependency): installed, or from the
folder $NSA_PEERS (e.g. a copy of it inside the checkout, carried to the GPU machine)."""

import importlib
import os
import sys


def import_flash_nsa():
    """The flash_nsa package, or None after printing the one line that says why its row is skipped."""
    peers = os.environ.get("NSA_PEERS")
    if peers and peers not in sys.path:
        sys.path.insert(0, peers)
    try:
        return importlib.import_module("flash_nsa")
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "flash_nsa":
            print("flash_nsa not found: skipping its row (set NSA_PEERS to a folder holding flash_nsa/)")
        else:  # its own imports: e.g. pkg_resources, which setuptools >= 81 no longer ships
            print(f"flash_nsa does not import ({type(e).__name__}: {e}): skipping its row")
        return None
