"""`python -m jaxdiff`: the `jaxdiff` command line."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
