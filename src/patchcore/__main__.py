"""``python -m patchcore``: the same command line as the ``patchcore`` console script."""

from .entry import main

if __name__ == "__main__":
    main()
