"""A model measured without allocating it: built on PyTorch's `meta` device from a spec and its defenses.

The reader (`fileformat.read`) gets the tensor shapes a file must hold from here, and the stages get
the parameter count and activations that `precode_cli/budget.py` turns into a memory estimate. This
lives with the stages because it needs the defenses (PRECODE changes the architecture), which the
core does not import.
"""

from __future__ import annotations

import math
import json
from functools import lru_cache
from typing import Any, Callable

from precode_cli.budget import ModelProfile
from precode_cli.errors import UserError


def profile(model_spec: dict[str, Any], defense_specs: list[dict[str, Any]],
            trusted_builder: str | None = None) -> ModelProfile:
    """Build the described model (defenses applied) on the meta device and measure it."""
    key = json.dumps([model_spec, defense_specs], sort_keys=True)
    return _profile(key, trusted_builder)


@lru_cache(maxsize=32)
def _profile(key: str, trusted_builder: str | None) -> ModelProfile:
    import torch

    from defenses import DefenseStack

    model_spec, defense_specs = json.loads(key)
    shape = tuple(model_spec["input_shape"])
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        try:
            model = DefenseStack.from_specs(defense_specs).build_model(model_spec, trusted_builder=trusted_builder)
        except UserError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
            raise UserError(f"the model spec cannot be built ({type(err).__name__}: {str(err)[:120]}).") from err
        params = {n: (tuple(p.shape), bool(p.requires_grad)) for n, p in model.named_parameters()}
        buffers = {n: (tuple(b.shape), _dtype_name(b.dtype)) for n, b in model.named_buffers()}
        outputs = [0]

        def count(_module: Any, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                outputs[0] += output.numel()

        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        hooks = [m.register_forward_hook(count) for m in leaves]
        try:
            with torch.no_grad():
                model.eval()
                model(torch.zeros(1, *shape))
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
            raise UserError(f"the model spec cannot run on its own input shape {list(shape)} "
                            f"({type(err).__name__}: {str(err)[:120]}).") from err
        finally:
            for hook in hooks:
                hook.remove()
    n_params = sum(math.prod(s) for s, _ in params.values())
    return ModelProfile(params=params, buffers=buffers, n_params=n_params, activations=outputs[0])



def _dtype_name(dtype: Any) -> str:
    import torch

    names = {torch.float32: "F32", torch.int64: "I64", torch.float64: "F64", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
    return names.get(dtype, str(dtype))


def for_files(trusted_builder: str | None = None) -> Callable[[dict[str, Any]], ModelProfile]:
    """What `fileformat.read(..., profile=...)` needs: a file's metadata -> the model it describes."""
    return lambda meta: profile(meta["model"], meta["defense"], trusted_builder)
