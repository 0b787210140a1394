"""precode's gradient-space defenses as Flower client mods, for clients that train with their own loop.

`defense_mod("noise", noise_scale=0.01)` returns a mod (`ClientApp(train_fn, mods=[...])`) that
lets the ClientApp train, reads its update as a gradient, g = (global - returned) / lr (lr from the
server's config), applies the defense's `perturb_gradients` from `defenses.REGISTRY` to g, and
sends back global - lr * perturbed(g) in place of the returned weights. Other message types pass
through, and a train message without a learning rate is answered with an error, never with an
unprotected update.

    noise  Gaussian or Laplace noise (noise_scale, noise_distribution), as `--defense noise`
    prune  keep the largest entries of each tensor (prune_keep), as `--defense prune`
    clip   clip the whole update's gradient to L2 norm `clip` (default 1) and add N(0, (sigma * clip)^2) (sigma
           default 0.1): ppp's clip-and-noise on every parameter. Not `--defense dp`, which clips each example's
           gradient inside every local step (train with `train_locally` and Setup(defense="dp") for that) and has
           dp's epsilon; this is update-level clipping, as DP-FedAvg's client side, with no accountant here.
    ppp    ppp's partial perturbation (ppp_clip, ppp_sigma, ppp_params): clip and noise on the parameters in front
           of PRECODE's decoder; the model must have PRECODE (Setup(defense="precode")) for the mod to find them

For one local step of plain SGD, global - returned = lr * g exactly as capture computes g, so the
mod shares global - lr * perturbed(g): the update `precode capture-gradients --local-steps 1
--defense D` writes with the same generator, to float rounding (the mod works in float64). For
several local steps the mod perturbs the update once, not every step's gradient as capture and
`train_locally` do; the update it shares is then what an attack on the update must face, but not
the same distribution as per-step perturbation.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import Context, Error, Message, MessageType

from defenses import REGISTRY
from defenses.base import Defense, number_in
from defenses.ppp import DEFAULT_CLIP, DEFAULT_SIGMA, PartialPerturbation, parameters_before_decoder
from precode_cli.errors import UserError
from precode_cli.flower.records import ConfigKeys, arrays_of, config_of, to_record, to_tensors
from precode_cli.flower.setup import Setup

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
GeneratorFn = Callable[[Message, Context], torch.Generator]
MODS = ("noise", "prune", "clip", "ppp")
ERROR_CODE = 0  # Flower's "unknown" error code: the reason says what happened


def defense_mod(name: str, *, setup: Setup | None = None, lr: float | None = None, keys: ConfigKeys = ConfigKeys(),
                generator: GeneratorFn | None = None, arrayrecord_key: str | None = None,
                **options: Any) -> Mod:
    """A Flower mod that applies precode's defense `name` to the client's update; see the module docstring.

    options: the defense's parameters by their command-line names (noise_scale=, prune_keep=, clip=, sigma=,
    ppp_clip=, ppp_sigma=, ppp_params=). setup: the client's model, to perturb only its trainable parameters
    (and, for ppp, to find the layers in front of the decoder); without it every float array the client
    returns counts. lr: a fixed learning rate instead of the config's `keys.lr`. generator: a function of
    (message, context) giving the noise's torch.Generator (default: a fresh seed from the OS for every message).
    """
    make = _factory(name, setup, options)
    names = setup.trainable_names() if setup is not None else None

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        try:
            rate = lr if lr is not None else config_of(msg).get(keys.lr)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
                raise UserError(f"the train config has no positive learning rate {keys.lr!r} (found {rate!r}), "
                                "which the update's gradient needs")
            global_arrays = to_tensors(arrays_of(msg, arrayrecord_key)[1])
        except UserError as err:
            return Message(Error(ERROR_CODE, f"precode's {name} mod refused the message: {err}"), reply_to=msg)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        key, returned_record = arrays_of(reply, arrayrecord_key)
        returned = to_tensors(returned_record)
        chosen = [n for n in (names if names is not None else returned)
                  if n in global_arrays and n in returned and returned[n].is_floating_point()
                  and returned[n].shape == global_arrays[n].shape]
        if names is not None and len(chosen) != len(names):
            lost = sorted(set(names) - set(chosen))[0]
            return Message(Error(ERROR_CODE, f"precode's {name} mod: the update lacks parameter {lost!r}"),
                           reply_to=msg)
        gen = generator(msg, context) if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
        shared = perturb_update({n: global_arrays[n] for n in chosen}, {n: returned[n] for n in chosen},
                                float(rate), make(chosen), gen)
        reply.content[key] = to_record(shared, like=returned_record)
        return reply

    return mod


def perturb_update(global_params: dict[str, torch.Tensor], returned: dict[str, torch.Tensor], lr: float,
                   defense: Defense, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """global - lr * defense(g) for g = (global - returned) / lr, computed in float64, returned in each dtype.

    A tensor the defense hands back untouched (ppp's layers after the sample) keeps the returned weights bit
    for bit."""
    grads = {n: (global_params[n].double() - returned[n].double()) / lr for n in returned}
    perturbed = defense.perturb_gradients(grads, generator)
    return {n: returned[n] if perturbed[n] is grads[n] else
            (global_params[n].double() - lr * perturbed[n].double()).to(returned[n].dtype) for n in returned}


def _factory(name: str, setup: Setup | None, options: dict[str, Any]) -> Callable[[list[str]], Defense]:
    """The defense for a list of chosen parameter names, checked once when the mod is made."""
    if name == "dp":
        raise UserError("dp clips each example's gradient inside every local step, which a mod on the update cannot "
                        "do; train with train_locally and Setup(defense='dp'), or use defense_mod('clip') for "
                        "update-level clipping and noise.")
    if name not in MODS:
        raise UserError(f"precode's Flower mods are {', '.join(MODS)}, not {name!r}; model-side defenses (precode, "
                        "soteria, dp) act inside training: use train_locally with Setup(defense=...).")
    if name == "clip":
        unknown = sorted(set(options) - {"clip", "sigma"})
        if unknown:
            raise UserError(f"defense_mod('clip') takes clip= and sigma=, not {unknown[0]}=.")
        clip = number_in(options.get("clip", DEFAULT_CLIP), "clip", 0)
        sigma = number_in(options.get("sigma", DEFAULT_SIGMA), "sigma", 0, low_included=True)
        return lambda chosen: PartialPerturbation(clip=clip, sigma=sigma, params=list(chosen))
    cls = REGISTRY[name]
    unknown = sorted(set(options) - set(cls.cli_options.values()))
    if unknown:
        raise UserError(f"defense_mod({name!r}) takes {', '.join(f'{o}=' for o in cls.cli_options.values())}, "
                        f"not {unknown[0]}=.")
    kwargs = {param: options[option] for param, option in cls.cli_options.items() if options.get(option) is not None}
    defense = cls(**kwargs)
    if name == "ppp" and defense.param_names is None:
        if setup is None:
            raise UserError("defense_mod('ppp') needs the client's model to find the layers in front of PRECODE's "
                            "decoder: pass setup=Setup.create(..., defense='precode'), or ppp_params=[...].")
        bottleneck = [spec for spec in setup.defense_specs if spec["name"] in ("precode", "ppp")]
        if not bottleneck:
            raise UserError("defense_mod('ppp') perturbs the layers in front of PRECODE's decoder, but the setup's "
                            "model has no PRECODE; use Setup.create(..., defense='precode').")
        at = defense.at or bottleneck[0]["params"]["at"]
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            model, _ = setup.build()
            defense.perturbed = parameters_before_decoder(model, tuple(setup.model_spec["input_shape"]), at)
        defense.param_names = list(defense.perturbed)
    return lambda chosen: defense
