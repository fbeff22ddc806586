"""``python -m jsoftmax``: the same as the ``jsoftmax`` command."""

from jsoftmax._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
