"""The ``patchcore`` command's entry point: on a runtime-only install, say what to install, not a traceback."""

from __future__ import annotations

import sys

FULL = ("torch", "torchvision", "timm", "faiss", "scipy", "sklearn", "skimage", "safetensors", "typer", "rich")


def main(argv: list[str] | None = None) -> None:
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in FULL:
            raise
        print(f"error: the patchcore command needs the full install ({e.name} is missing): "
              f"pip install \"patchcore[full]\". This install scores exported models only: "
              f"from patchcore import runtime", file=sys.stderr)
        sys.exit(1)
    cli_main(argv)
