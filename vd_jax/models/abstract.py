"""Param shapes without params: what converters fill and shardings are planned on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def abstract_params(init_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`jax.eval_shape(init_fn, ...)['params']` as a plain nested dict: shapes, no memory."""
    variables = jax.eval_shape(init_fn, *args, **kwargs)
    return jax.tree_util.tree_map(lambda x: x, dict(variables["params"]))
