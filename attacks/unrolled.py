"""Inverting a FedAvg update: replay the client's local steps differentiably and match the result.

A client that trains for several steps sends back weights, not a gradient. Following Geiping et
al. (2020, section 6; inversefed's FedAvgReconstructor, breaching's multi-step user), the attacker
replays the client's local SGD on its dummy images from the global weights, with the recipe the
update file records (`precode_cli.local_training.sgd_step`, the very function the client ran),
and matches the replayed pseudo-gradient (global - final) / lr to the shared one by cosine
distance. Every local step's gradient is computed with `torch.func.grad`, and the outer gradient
with respect to the images differentiates through all of them; `vmap` batches victims and restarts.

PRECODE draws a fresh noise sample in every forward pass, so each local step of the client used
another draw. The attacker replays fresh draws too, one per local step (`ig`, `ig-adaptive`), or
optimises one sample per local step jointly with the images (`ig-noise`: [steps, B, K] per row).

Two engines compute the same objective. `FactoredUnroll` serves models made of Linear layers
(the MLP, with or without PRECODE) when there is no weight decay: a Linear layer's gradient at
every step is a sum of outer products d a^T (output gradient times input), so the weights after
t steps are the global ones minus a low-rank sum, applied to the next step's input as
x W^T - lr * sum_t c_t (x a_t^T) d_t without forming any matrix, and the cosine terms of the final
update follow from the factors as in `attacks.layerwise`. Every other model takes the generic
engine: `torch.func.grad` per step, `vmap` over rows, full weight tensors.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from attacks import layerwise
from attacks.base import AttackTarget
from attacks.optimization import MatchingConfig, _Problem, cosine_distance, total_variation
from precode_cli.inspection import called_modules
from precode_cli.local_training import LocalRecipe, sgd_step


class UnrolledProblem(_Problem):
    """The vectorised objective of V victims x R restarts whose shared quantity is a multi-step update."""

    def __init__(self, targets: list[AttackTarget], labels: list[torch.Tensor], config: MatchingConfig,
                 seed: int) -> None:
        recipes = {t.local for t in targets}
        if len(recipes) != 1:
            raise ValueError("a vectorised run needs updates of one local recipe")
        self.recipe = targets[0].local
        self.input_shape = tuple(targets[0].input_shape)
        super().__init__(targets, labels, config, seed)

    def noise_shape(self, vb: nn.Module) -> tuple[int, ...]:
        """One latent draw per image of every local step: [steps, local batch, K]."""
        return (self.recipe.steps, self.recipe.batch_size, vb.k)

    def _build_step(self) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        if FactoredUnroll.supports(self.model, self.trainable, self.recipe, self.input_shape) \
                and self.matched_dim is None and self.fixed_dim is None:
            factored = FactoredUnroll(self.model, self.loss_fn, self.matched, self.shared, self.shared_norm,
                                      self.labels, self.config.tv_weight, self.vbs, self.recipe)
            leaves = [self.inputs] + list(self.noise.values())
            self.engine = "unrolled-factored"
            return lambda: factored(self.inputs, self.noise or self.replay_noise(), leaves)
        return self._generic_step()

    def _generic_step(self) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        model, loss_fn, vbs, tv_weight, recipe = self.model, self.loss_fn, self.vbs, self.config.tv_weight, self.recipe
        trainable = self.trainable

        def client_loss(params, x, y, rest, noise):
            for name, vb in vbs.items():
                vb.noise = noise[name] if noise else None
            try:
                logits = functional_call(model, {**rest, **params}, (x,))
                return loss_fn(model, logits, y)
            finally:
                for vb in vbs.values():
                    vb.noise = None

        def replayed_update(x, noise, matched, fixed, y):
            """The pseudo-gradient (global - final) / lr of the client's local steps on images x."""
            start = {n: matched[n] if n in matched else fixed[n] for n in trainable}
            rest = {n: t for n, t in fixed.items() if n not in start}
            params, momentum = start, {}
            for step in range(recipe.steps):
                a, b = recipe.step_batch(step)
                draw = {name: sample[step, : b - a] for name, sample in noise.items()} if noise else None
                g = grad(client_loss)(params, x[a:b], y[a:b], rest, draw)
                params, momentum = sgd_step(params, g, momentum, recipe, first=step == 0)
            return {n: (start[n] - params[n]) / recipe.lr for n in matched}

        def objective(x, noise, matched, fixed, shared, shared_norm, y):
            replayed = replayed_update(x, noise, matched, fixed, y)
            names = list(shared)
            distance = cosine_distance([replayed[n] for n in names], [shared[n] for n in names], shared_norm)
            total = distance + tv_weight * total_variation(x) if tv_weight > 0 else distance
            return total, distance

        self.engine = "unrolled"
        argnums = (0, 1) if self.noise else 0
        vectorised = vmap(
            grad(objective, argnums=argnums, has_aux=True),
            in_dims=(0, 0 if (self.noise or self.replay) else None, self.matched_dim, self.fixed_dim, 0, 0, 0),
            randomness="different",
        )

        def step() -> tuple[list[torch.Tensor], torch.Tensor]:
            noise = self.noise or self.replay_noise()
            grads, distance = vectorised(self.inputs, noise, self.matched_params, self.fixed,
                                         self.shared, self.shared_norm, self.labels)
            if self.noise:
                input_grad, noise_grads = grads
                return [input_grad] + [noise_grads[n] for n in self.noise], distance
            return [grads], distance

        return step


def step_coefficients(recipe: LocalRecipe, steps_done: int) -> list[float]:
    """c_t with W after `steps_done` steps = W_0 - lr * sum_t c_t g_t (g_t: step t's gradient).

    With momentum m the direction of step u is sum_{t<=u} m^(u-t) g_t (PyTorch's SGD, no dampening),
    so c_t = 1 + m + ... + m^(steps_done-1-t); without momentum every c_t is 1.
    """
    m = recipe.momentum
    return [sum(m ** k for k in range(steps_done - t)) for t in range(steps_done)]


class FactoredUnroll:
    """The unrolled objective of `rows` victims sharing one Linear-only model, from gradient factors."""

    @staticmethod
    def supports(model: nn.Module, trainable: list[str], recipe: LocalRecipe, input_shape: tuple[int, ...]) -> bool:
        """Linear layers only (each called once per forward), every trainable parameter in one, no weight decay."""
        if recipe.weight_decay or not layerwise.supports(model):
            return False
        linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in trainable}
        if not owners <= linears:
            return False
        calls = called_modules(model, input_shape, lambda m: isinstance(m, nn.Linear))
        return len(calls) == len(set(calls))

    def __init__(self, model: nn.Module, loss_fn: Callable, matched: list[str], shared: dict[str, torch.Tensor],
                 shared_norm: torch.Tensor, labels: torch.Tensor, tv_weight: float,
                 bottlenecks: dict[str, nn.Module], recipe: LocalRecipe) -> None:
        self.model, self.loss_fn, self.labels, self.tv_weight = model, loss_fn, labels, tv_weight
        self.shared, self.shared_norm, self.bottlenecks, self.recipe = shared, shared_norm, bottlenecks, recipe
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        wanted = set(matched)
        self.matched = {name: {p: f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)
                               if (f"{name}.{p}" if name else p) in wanted} for name, m in self.linears.items()}

    def __call__(self, inputs: torch.Tensor, noise: dict[str, torch.Tensor] | None,
                 leaves: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Gradients of the summed objective for `leaves`, and each row's cosine distance."""
        rows, lr = inputs.shape[0], self.recipe.lr
        history: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in self.linears}
        for step in range(self.recipe.steps):
            a, b = self.recipe.step_batch(step)
            batch = b - a
            coefficients = step_coefficients(self.recipe, step)
            captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

            weights = self._column_weights(coefficients, history, inputs)

            def corrected(name: str):
                def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                    x = args[0].reshape(rows, batch, -1)
                    if history[name]:  # every earlier step's factors at once: one pair of matmuls
                        acts = torch.cat([a_t for a_t, _ in history[name]], dim=1)  # [rows, n, in]
                        grads = torch.cat([d_t for _, d_t in history[name]], dim=1) * weights  # [rows, n, out]
                        shift = torch.bmm(torch.bmm(x, acts.transpose(1, 2)), grads)  # (x a^T) d: [rows, B, out]
                        if module.bias is not None:
                            shift = shift + grads.sum(dim=1, keepdim=True)
                        output = output - lr * shift.reshape(output.shape)
                    captured[name] = (x, output)
                    return output
                return hook

            hooks = [m.register_forward_hook(corrected(name)) for name, m in self.linears.items()]
            for name, vb in self.bottlenecks.items():
                vb.noise = noise[name][:, step, :batch].reshape(rows * batch, -1) if noise else None
            try:
                x = inputs[:, a:b].reshape(rows * batch, *inputs.shape[2:])
                logits = self.model(x)
                # Each row's loss is a mean over its own images; summed over rows it is rows x the mean over all.
                loss = self.loss_fn(self.model, logits, self.labels[:, a:b].reshape(-1)) * rows
            finally:
                for hook in hooks:
                    hook.remove()
                for vb in self.bottlenecks.values():
                    vb.noise = None
            names = list(captured)
            deltas = torch.autograd.grad(loss, [captured[n][1] for n in names], create_graph=True)
            for name, delta in zip(names, deltas):
                history[name].append((captured[name][0], delta.reshape(rows, batch, -1)))
        return self._distance(inputs, history, leaves)

    def _column_weights(self, coefficients: list[float], history: dict, inputs: torch.Tensor) -> torch.Tensor:
        """c_t for every earlier example row of the concatenated factors, [1, n, 1]."""
        first = next(iter(history.values()))
        sizes = [d_t.shape[1] for _, d_t in first]
        column = [c for c, size in zip(coefficients, sizes) for _ in range(size)]
        return torch.tensor(column, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1)

    def _distance(self, inputs: torch.Tensor, history: dict, leaves: list[torch.Tensor]):
        """Cosine distance of the replayed update (sum_t c_t d_t^T a_t per layer) to the shared one."""
        rows = inputs.shape[0]
        final = step_coefficients(self.recipe, self.recipe.steps)
        dot = torch.zeros(rows, dtype=inputs.dtype, device=inputs.device)
        square = torch.zeros(rows, dtype=inputs.dtype, device=inputs.device)
        for name, chosen in self.matched.items():
            if not chosen or not history[name]:
                continue
            acts = torch.cat([a_t for a_t, _ in history[name]], dim=1)  # [rows, n, in]
            grads = torch.cat([c * d_t for c, (_, d_t) in zip(final, history[name])], dim=1)  # [rows, n, out]
            if "weight" in chosen:
                s_weight = self.shared[chosen["weight"]]  # [rows, out, in]
                dot = dot + (torch.bmm(acts, s_weight.transpose(1, 2)) * grads).sum(dim=(1, 2))
                square = square + (torch.bmm(grads, grads.transpose(1, 2))
                                   * torch.bmm(acts, acts.transpose(1, 2))).sum(dim=(1, 2))
            if "bias" in chosen:
                g_bias = grads.sum(dim=1)
                dot = dot + (g_bias * self.shared[chosen["bias"]]).sum(dim=1)
                square = square + g_bias.pow(2).sum(dim=1)
        distance = 1 - dot / (square.clamp_min(1e-24).sqrt() * self.shared_norm).clamp_min(1e-12)
        total = distance.sum()
        if self.tv_weight > 0:
            total = total + self.tv_weight * layerwise._total_variation_per_row(inputs).sum()
        return list(torch.autograd.grad(total, leaves)), distance.detach()
