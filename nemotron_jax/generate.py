"""`nemotron_jax.generate(model, prompts, max_new_tokens=...)` and the generation CLI (`python -m nemotron_jax.generate`).

The function lives in `nemotron_jax.inference.engine`. This module is made callable so that the name a user
calls and the name of the CLI module can be the same (`nemotron_jax.generate`) without one shadowing the
other when the submodule is imported.
"""

from __future__ import annotations

import sys
import types

from nemotron_jax.inference.engine import GenerationResult, generate

__all__ = ["GenerationResult", "generate"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> GenerationResult:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
