"""Runs `vd_jax.data.cli` (see its docstring for the subcommands)."""

import sys

from vd_jax.data.cli import main

if __name__ == "__main__":
    main(sys.argv)
