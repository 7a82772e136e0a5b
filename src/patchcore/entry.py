"""The ``patchcore`` command's entry point: on a runtime-only install, say what to install, not a traceback."""

from __future__ import annotations

import sys

FULL = ("torch", "torchvision", "timm", "faiss", "scipy", "sklearn", "skimage", "safetensors", "typer", "rich")

BARE_HELP = """\
Usage: patchcore COMMAND ...

This install (pip install patchcore) scores models exported with `patchcore export`, from Python, without
torch:

    from patchcore import runtime
    rt = runtime.load("bottle-export")          # an export folder
    for p in rt.predict(["part1.png", "part2.png"]):
        print(p.name, p.score, p.is_anomalous)

The command needs more:
  pip install "patchcore[serve]"   patchcore serve, versions, rollback, and info for export folders (no torch)
  pip install "patchcore[full]"    every command: fit, update, predict, evaluate, export, serve, info, demo
"""


def main(argv: list[str] | None = None) -> None:
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in FULL:
            raise
        args = sys.argv[1:] if argv is None else argv
        if not args or args[0] in ("--help", "-h", "help"):
            print(BARE_HELP, end="")
            sys.exit(0)
        print(f"error: the patchcore command needs the full install ({e.name} is missing): "
              f"pip install \"patchcore[full]\". This install scores exported models only: "
              f"from patchcore import runtime", file=sys.stderr)
        sys.exit(1)
    cli_main(argv)
