"""`python -m vd_jax.tiny_folder DIR [tiny|small]`: a random VD folder in diffusers format.

Runs `vd_jax.convert.tiny_folder` (needs the torch extra); the command keeps this name.
"""

import sys

if __name__ == "__main__":
    from vd_jax.convert.tiny_folder import main

    main(sys.argv)
