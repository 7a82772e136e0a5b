"""Where the benchmarks find the shared data: one place for all of them.

``DATA`` is the folder that holds ``mvtec_ad/``: ``$PATCHCORE_DATA`` if set, else ``../shared/data`` beside the
repository (where the tests look too). Scripts with a command line also take ``--data DIR``
(:func:`add_data_argument`) and pass it on to the processes they start.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PATCHCORE_DATA", REPO.parent / "shared" / "data"))


def add_data_argument(ap: argparse.ArgumentParser) -> None:
    """``--data DIR``, the folder holding ``mvtec_ad/`` (default: :data:`DATA`)."""
    ap.add_argument("--data", type=Path, default=DATA, metavar="DIR",
                    help="the shared data folder, holding mvtec_ad/ (default: $PATCHCORE_DATA, else ../shared/data)")


def mvtec(data: str | os.PathLike | None = None) -> Path:
    """The MVTec AD root under ``data`` (default :data:`DATA`)."""
    return Path(DATA if data is None else data) / "mvtec_ad"
