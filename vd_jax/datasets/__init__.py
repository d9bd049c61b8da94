"""`python -m vd_jax.datasets {folder|webdataset|cache}`: the data-preparation command.

The datasets themselves, the input pipeline and the latent cache live in `vd_jax.data`; this
package only keeps the command's name.
"""
