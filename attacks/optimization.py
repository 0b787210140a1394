"""The one optimisation loop that every gradient-matching attack configures, for many victims at once.

It optimises dummy inputs (and, for `ig-noise`, PRECODE's noise sample) so that the gradient they
produce under the client's loss matches the shared gradient. Victims are independent: each has its
own inputs, labels, shared gradient and (possibly) weights, and the objective is a sum of one term
per victim. `attacks.layerwise` evaluates all terms from one batched pass when the model allows
(Linear and Conv2d layers, shared weights), `torch.func.vmap` otherwise; since Adam, the sign step
and the box are elementwise, attacking V victims together is the same computation as attacking
them one by one, only faster. Restarts are more rows of the same batch; the restart with
the lowest final matching loss wins (the truth is never looked at).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from attacks import layerwise
from attacks.base import AttackTarget, Progress
from precode_cli.errors import UserError

INITS = ("randn", "rand", "zeros")
# The vmap engine materialises every row's weight gradient at once; above this many parameters that memory
# traffic made it slower per victim than one row at a time (benchmarks/attack_roofline.py: lenet, 16k
# parameters, 3.9x faster with vmap at 32 victims; cnn, 2.2M, 1.9x slower; mlp 4.2M and convnet 2.9M slower too).
VMAP_MAX_PARAMETERS = 1_000_000
# Victims whose dumps carry other weights are matched layer by layer one weight group after another; a
# small model's vmap vectorises across weights and overtakes from a few groups on (benchmarks/
# attack_throughput.py --weights own: lenet at 32 victims, as fast at 2 groups, 18% faster from 4 on).
LAYERWISE_MAX_WEIGHT_GROUPS = 2
RESTART_SEED_STRIDE = 1_000_003  # restart r of seed s starts from the draw of seed s + r * stride
REPLAY_SEED_OFFSET = 7_777  # PRECODE's replayed noise: its own generator per restart


@dataclass
class MatchingConfig:
    """Settings of one gradient-matching run."""

    iterations: int = 7000
    lr: float = 0.01
    tv_weight: float = 1e-6
    signed: bool = True  # step on the sign of the input gradient (Inverting Gradients)
    boxed: bool = True  # keep inputs inside the valid pixel range
    lr_decay_at: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)  # fractions of `iterations`; lr x0.1 at each
    init: str = "randn"  # randn: N(0, 1) in input space; rand: uniform in the valid box; zeros
    restarts: int = 1
    ignore: tuple[str, ...] = ()  # modules whose parameters' gradients are left out of the distance
    optimize_noise: bool = False  # also optimise PRECODE's noise sample jointly with the input
    low_rank: bool = True  # match exactly low-rank Linear gradients through their factors (attacks.low_rank)
    patience: int = 0  # early stop (see `converged`): check every `patience` iterations; 0 never stops early
    min_improvement: float = 0.01  # ... and stop a row whose best loss improved by less than this fraction
    bn_weight: float = 0.0  # ig-bn: weight of GradInversion's BatchNorm prior (attacks/bn_prior.py); 0: none
    progress_every: int = 25


@dataclass
class MatchState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    tensors: dict[str, torch.Tensor]  # inputs, noise.*, adam.*, traces, rng


@dataclass
class MatchOutcome:
    """Per victim: the best restart's inputs and loss trace; `finished` < iterations when interrupted."""

    inputs: torch.Tensor  # [V, B, C, H, W] in the model's input space
    traces: torch.Tensor  # [V, iterations]: the matching loss (cosine distance) per iteration
    restart_losses: torch.Tensor  # [V, restarts]: each restart's final matching loss
    finished: int
    state: MatchState | None = None  # set when interrupted
    extra: dict[str, Any] = field(default_factory=dict)
    stopped: torch.Tensor | None = None  # [V]: the iteration where the chosen restart stopped early, -1 if it did not
    skipped: torch.Tensor | None = None  # [V]: the chosen restart's steps skipped for a non-finite loss


def gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of a gradient taken as one vector over all parameters."""
    return torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()


def cosine_distance(grads: list[torch.Tensor], shared: list[torch.Tensor], shared_norm: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of two gradients, each taken as one vector over all parameters.

    `shared_norm` is `gradient_norm(shared)`, passed in because it is constant during an attack.
    """
    dot = torch.stack([(g * s).sum() for g, s in zip(grads, shared)]).sum()
    return 1 - dot / (gradient_norm(grads) * shared_norm).clamp_min(1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def converged(traces: torch.Tensor, done: int, patience: int, min_improvement: float) -> torch.Tensor:
    """Which rows have stopped improving: the early-stop rule, checked after every `patience` iterations.

    A row has converged at iteration `done` (a multiple of `patience`, at least twice it) when the best
    matching loss of its last `patience` iterations is not at least `min_improvement` (a fraction)
    below its best loss before them. `traces` is [rows, >= done]; returns a bool [rows].
    """
    if patience <= 0 or done < 2 * patience or done % patience:
        return torch.zeros(traces.shape[0], dtype=torch.bool)
    before = traces[:, : done - patience].min(dim=1).values
    recent = traces[:, done - patience : done].min(dim=1).values
    return recent > before * (1 - min_improvement)


def matched_names(param_names: list[str], ignore: tuple[str, ...]) -> list[str]:
    """The parameters whose gradients enter the distance: all but those under an ignored module."""

    def under(name: str, module: str) -> bool:
        return name == module or name.startswith(module + ".")

    for module in ignore:
        if not any(under(name, module) for name in param_names):
            raise UserError(f"--ignore-layers names {module!r}, which has no parameter with a shared gradient; "
                            f"parameters are named like {param_names[0]!r}.")
    kept = [name for name in param_names if not any(under(name, module) for module in ignore)]
    if not kept:
        raise UserError(f"--ignore-layers {','.join(ignore)} leaves no gradient to match.")
    return kept


def bottlenecks(model: nn.Module) -> dict[str, nn.Module]:
    """PRECODE's bottlenecks in the model, by module name.

    Recognised by their `stochastic_bottleneck` marker rather than their class, since attacks do not
    import defenses; such a module has `k` latents, a `decoder`, and takes a fixed `noise` draw.
    """
    return {name: m for name, m in model.named_modules() if getattr(m, "stochastic_bottleneck", False)}


def match_gradients(
    targets: list[AttackTarget],
    labels: list[torch.Tensor],
    config: MatchingConfig,
    seed: int,
    progress: Progress | None = None,
    resume: MatchState | None = None,
    checkpoint: Callable[[MatchState], None] | None = None,
    checkpoint_every: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> MatchOutcome:
    """Optimise dummy inputs for every target at once; targets must share architecture and batch size.

    Victim v, restart r starts from a draw seeded by (seed, r) alone, so a victim gets the same
    start whether it is attacked alone or with others. When `should_stop()` turns true (Ctrl-C),
    the run returns after the current step with what it has and the `state` to resume from.
    """
    if not targets or len({(t.batch_size, tuple(t.input_shape)) for t in targets}) != 1:
        raise ValueError("a vectorised run needs targets that share batch size and input shape")
    problem = make_problem(targets, labels, config, seed)
    rows = problem.rows
    variables = [problem.inputs] + list(problem.noise.values())
    optimizer = torch.optim.Adam(variables, lr=config.lr)
    milestones = sorted({int(config.iterations * f) for f in config.lr_decay_at})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    traces = LossTrace(rows, config.iterations, problem.device)  # on the device: no sync per step
    stops = EarlyStops(rows)
    skipped = NonFiniteSteps(rows, problem.device)
    start = 0
    if resume is not None:
        start = _restore(resume, problem, optimizer, scheduler, traces)
        stops.load(resume.tensors.get("stopped"), variables, problem)
        skipped.load(resume.tensors.get("skipped"))
    else:
        torch.manual_seed(seed)  # the model's own randomness (PRECODE's sampling) in the attacker's replay
    for step in range(start, config.iterations):
        if stops.all_stopped():
            break
        if should_stop is not None and should_stop():
            return problem.outcome(traces.upto(step), step,
                                   _state(step, problem, optimizer, traces, stops, skipped), stops.at, skipped.count)
        optimizer.zero_grad(set_to_none=True)
        grads, distance = problem.step()
        grads, distance, finite = skipped.screen(step, grads, distance.detach(), problem.active, traces)
        traces.record(step, distance, problem.active)
        kept = [variable.detach().clone() for variable in variables]
        for variable, g in zip(variables, grads):
            variable.grad = g.sign() if config.signed else g
        optimizer.step()
        scheduler.step()
        if config.boxed:
            with torch.no_grad():
                problem.inputs.copy_(torch.maximum(torch.minimum(problem.inputs, problem.upper), problem.lower))
        skipped.hold(variables, kept, finite)
        stops.hold(variables)
        done = step + 1
        if config.patience and done < config.iterations:
            stops.check(traces.upto(done), done, config, variables, problem)
        if progress is not None and (done % config.progress_every == 0 or done == config.iterations):
            progress(done)
        if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.iterations:
            checkpoint(_state(done, problem, optimizer, traces, stops, skipped))
    if progress is not None and stops.all_stopped():
        progress(config.iterations)
    return problem.outcome(traces.upto(config.iterations), config.iterations, None, stops.at, skipped.count)


class NonFiniteSteps:
    """Steps whose matching loss or gradient was not finite (a replay that diverged), skipped row by row.

    Such a step leaves the row where it was (its variables are put back) and records the row's
    previous loss in the trace (2, the largest cosine distance, before any); the count per row goes
    into the reconstruction's note. Everything stays on the device: no sync per step.
    """

    FIRST = 2.0  # the trace's value for a first step that was not finite

    def __init__(self, rows: int, device: torch.device) -> None:
        self.count = torch.zeros(rows, dtype=torch.long, device=device)

    def screen(self, step: int, grads: list[torch.Tensor], distance: torch.Tensor, active: torch.Tensor | None,
               traces: "LossTrace") -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Zero the gradients of non-finite rows and carry their previous loss; returns also the mask
        of rows whose step counts, over all rows."""
        rows = self.count.shape[0]
        finite = torch.isfinite(distance)
        for g in grads:
            per_row = torch.isfinite(g).flatten(1).all(dim=1)
            finite = finite & (per_row if active is None else per_row[active])
        ok = finite if active is None else torch.ones(rows, dtype=torch.bool, device=distance.device).index_put(
            (active,), finite)
        previous = traces.column(step - 1) if step > 0 else torch.full((rows,), self.FIRST, device=distance.device)
        distance = torch.where(finite, distance, previous if active is None else previous[active])
        self.count += (~ok).long()
        grads = [torch.where(ok.view(-1, *[1] * (g.dim() - 1)), g.nan_to_num(0.0, 0.0, 0.0), 0.0) for g in grads]
        return grads, distance, ok

    @staticmethod
    def hold(variables: list[torch.Tensor], kept: list[torch.Tensor], ok: torch.Tensor) -> None:
        """Put the skipped rows' variables back where they were before the step."""
        with torch.no_grad():
            for variable, before in zip(variables, kept):
                variable.copy_(torch.where(ok.view(-1, *[1] * (variable.dim() - 1)), variable, before))

    def load(self, stored: torch.Tensor | None) -> None:
        if stored is not None:
            self.count = stored.to(self.count.device).clone()


class EarlyStops:
    """Rows that stopped early (`converged`): when, their variables held where they stopped, and the
    problem restricted to the rows still running so that stopped rows cost nothing."""

    def __init__(self, rows: int) -> None:
        self.at = torch.full((rows,), -1, dtype=torch.long)  # the iteration a row stopped at; -1: running
        self._held: list[torch.Tensor] | None = None

    def all_stopped(self) -> bool:
        return bool((self.at >= 0).all())

    def check(self, traces: torch.Tensor, done: int, config: MatchingConfig, variables: list[torch.Tensor],
              problem: "_Problem") -> None:
        """Stop the running rows that have converged at iteration `done`."""
        newly = converged(traces.cpu(), done, config.patience, config.min_improvement) & (self.at < 0)
        if newly.any():
            self.at[newly] = done
            self._freeze(variables, problem)

    def hold(self, variables: list[torch.Tensor]) -> None:
        """Put the stopped rows' variables back where they stopped (Adam moves them on momentum)."""
        if self._held is None:
            return
        mask = (self.at >= 0).to(variables[0].device)
        with torch.no_grad():
            for variable, held in zip(variables, self._held):
                variable[mask] = held[mask]

    def load(self, stored: torch.Tensor | None, variables: list[torch.Tensor], problem: "_Problem") -> None:
        """Continue a run whose checkpoint recorded stopped rows (the variables hold their values)."""
        if stored is not None and bool((stored >= 0).any()):
            self.at = stored.clone()
            self._freeze(variables, problem)

    def _freeze(self, variables: list[torch.Tensor], problem: "_Problem") -> None:
        self._held = [v.detach().clone() for v in variables]
        running = (self.at < 0).nonzero().flatten()
        problem.restrict(running.to(problem.device) if len(running) else None)


def check_resume_state(targets: list[AttackTarget], labels: list[torch.Tensor], config: MatchingConfig, seed: int,
                       state: MatchState) -> None:
    """Refuse (one `UserError`) a stored state that does not fit these targets and settings, before any work."""
    problem = make_problem(targets, labels, config, seed)
    variables = [problem.inputs] + list(problem.noise.values())
    _check_state(state, problem, torch.optim.Adam(variables, lr=config.lr), config.iterations)


def make_problem(targets: list[AttackTarget], labels: list[torch.Tensor], config: MatchingConfig,
                 seed: int) -> "_Problem":
    """The objective for these targets: one shared gradient each, or a client update to unroll."""
    if targets[0].local is not None:
        from attacks.unrolled import UnrolledProblem  # it builds on _Problem below

        return UnrolledProblem(targets, labels, config, seed)
    return _Problem(targets, labels, config, seed)


class LossTrace:
    """The matching loss of every row at every step done, grown as steps are done.

    Memory follows the work done, not the work promised: `--iterations 1000000` allocates nothing
    up front, and the buffer at most doubles the steps done so far (in blocks of at least `BLOCK`).
    """

    BLOCK = 1024

    def __init__(self, rows: int, limit: int, device: torch.device) -> None:
        self.limit = limit
        self._buffer = torch.zeros(rows, 0, device=device)

    def record(self, step: int, values: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """The losses of step `step` (0-based), of all rows or of `rows` only."""
        if step >= self._buffer.shape[1]:
            size = min(self.limit, max(step + 1, 2 * self._buffer.shape[1], self.BLOCK))
            grown = torch.zeros(self._buffer.shape[0], size, device=self._buffer.device)
            grown[:, : self._buffer.shape[1]] = self._buffer
            self._buffer = grown
        if rows is None:
            self._buffer[:, step] = values
        else:
            self._buffer[rows, step] = values

    def column(self, step: int) -> torch.Tensor:
        """The losses of step `step` (0-based, already recorded), [rows]."""
        return self._buffer[:, step]

    def upto(self, steps: int) -> torch.Tensor:
        """The first `steps` columns, [rows, steps]."""
        if steps > self._buffer.shape[1]:
            self.record(steps - 1, self._buffer.new_zeros(self._buffer.shape[0]))
        return self._buffer[:, :steps]

    def load(self, values: torch.Tensor) -> None:
        """Continue from stored losses [rows, steps]."""
        self._buffer = torch.zeros(self._buffer.shape[0], 0, device=self._buffer.device)
        if values.shape[1]:
            self.record(values.shape[1] - 1, values[:, -1].to(self._buffer.device))
            self._buffer[:, : values.shape[1]] = values.to(self._buffer.device)


def _all_equal(dicts: list[dict[str, torch.Tensor]]) -> bool:
    """Whether every victim has the same tensors (the same weights or buffers) as the first."""
    return all(torch.equal(d[n], dicts[0][n]) for d in dicts[1:] for n in dicts[0])


class _Problem:
    """The vectorised objective of V victims x R restarts and its variables."""

    def __init__(self, targets: list[AttackTarget], labels: list[torch.Tensor], config: MatchingConfig, seed: int) -> None:
        self.config = config
        self.loss_fn = targets[0].loss_fn
        self.victims, self.restarts = len(targets), config.restarts
        self.rows = self.victims * self.restarts
        first = targets[0]
        self.model = first.model
        _disable_running_stats(self.model)
        self.vbs = bottlenecks(self.model)
        if config.optimize_noise and not self.vbs:
            raise UserError("ig-noise optimises PRECODE's noise sample, but this model has no PRECODE bottleneck; "
                            "use --method ig.")
        self.matched = matched_names(first.param_names, config.ignore)
        self.trainable = list(first.param_names)
        models = [t.model for t in targets]
        for model in models[1:]:
            _disable_running_stats(model)
        params = [dict(m.named_parameters()) for m in models]
        buffers = [dict(m.named_buffers()) for m in models]
        self.models = models
        fixed_names = [n for n in params[0] if n not in self.matched]
        self._matched_by_victim = [{n: p[n].detach() for n in self.matched} for p in params]
        self._fixed_by_victim = [{**{n: p[n].detach() for n in fixed_names}, **{n: buf[n] for n in buf}}
                                 for p, buf in zip(params, buffers)]
        self.matched_dim = None if _all_equal(self._matched_by_victim) else 0  # 0: one set per row
        self.fixed_dim = None if _all_equal(self._fixed_by_victim) else 0
        shared = {n: torch.stack([t.shared_grads[t.param_names.index(n)].detach() for t in targets]) for n in self.matched}
        self.shared = {n: g.repeat(self.restarts, *([1] * (g.dim() - 1))) for n, g in shared.items()}
        norms = torch.stack([gradient_norm([t.shared_grads[t.param_names.index(n)] for n in self.matched]) for t in targets])
        self.shared_norm = norms.repeat(self.restarts)
        self.device = first.shared_grads[0].device  # start and noise are drawn on the CPU, then moved here
        self.labels = torch.stack(labels).to(self.device).repeat(self.restarts, 1)
        self.lower, self.upper = first.lower.unsqueeze(0), first.upper.unsqueeze(0)
        shape = (first.batch_size, *first.input_shape)
        generators = [torch.Generator().manual_seed(seed + RESTART_SEED_STRIDE * r) for r in range(self.restarts)]
        starts = [_initial_inputs(shape, config.init, first.lower.cpu(), first.upper.cpu(), g).to(self.device)
                  for g in generators]
        self.inputs = torch.cat([s.unsqueeze(0).expand(self.victims, *shape) for s in starts]).clone()
        self.noise = {}
        if config.optimize_noise:  # the prior's draw, continuing each restart's generator
            for name, vb in self.vbs.items():
                draws = [torch.randn(*self.noise_shape(vb), generator=g).to(self.device) for g in generators]
                self.noise[name] = torch.cat([d.unsqueeze(0).expand(self.victims, *d.shape) for d in draws]).clone()
        self.inputs.requires_grad_(True)
        for tensor in self.noise.values():
            tensor.requires_grad_(True)
        # Without ig-noise the attacker replays PRECODE with fresh noise every step, drawn from each restart's
        # own generator (not inside vmap), so a victim sees the same draws alone or with any other victims.
        self.replay = [torch.Generator().manual_seed(seed + REPLAY_SEED_OFFSET + RESTART_SEED_STRIDE * r)
                       for r in range(self.restarts)] if self.vbs and not self.noise else []
        self.active: torch.Tensor | None = None  # the rows still optimised (see `restrict`); None: all
        self.restrictable = False  # set by the engines that can compute a subset of the rows
        self.bn_prior = None  # ig-bn: the BatchNorm statistics every row's dummy batch must reproduce
        if config.bn_weight > 0:
            from attacks.bn_prior import BatchNormPrior  # it builds on this module

            self.bn_prior = BatchNormPrior(self.model, targets, self.restarts, self.device)
        self._step = self._build_step()

    def restrict(self, active: torch.Tensor | None) -> None:
        """From now on compute only these rows (the others stopped early), where the engine can; the
        stopped rows' gradients are then zero. Other engines go on computing every row."""
        if self.restrictable:
            self.active = active

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The running rows of a per-row tensor."""
        return tensor if self.active is None else tensor[self.active]

    def take_noise(self, noise: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        return {name: self.take(value) for name, value in noise.items()} if noise else noise

    def spread(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A running rows' tensor back at full size, zero for the stopped rows."""
        if self.active is None:
            return values
        full = torch.zeros_like(like)
        full[self.active] = values
        return full

    def noise_shape(self, vb: nn.Module) -> tuple[int, ...]:
        """One row's noise sample for a bottleneck: [B, K], a latent draw per image."""
        return (self.inputs.shape[1], vb.k)

    def replay_noise(self) -> dict[str, torch.Tensor] | None:
        """This step's fresh noise for every bottleneck, [rows, B, K], the same for all victims of a restart."""
        if not self.replay:
            return None
        draws = {name: [torch.randn(*self.noise_shape(vb), generator=g).to(self.device) for g in self.replay]
                 for name, vb in self.vbs.items()}
        return {name: torch.cat([d.unsqueeze(0).expand(self.victims, *d.shape) for d in per_restart])
                for name, per_restart in draws.items()}

    @functools.cached_property
    def matched_params(self) -> dict[str, torch.Tensor]:
        """The matched weights for vmap: one set for all rows, or stacked per row (`matched_dim` 0)."""
        return self._per_row(self._matched_by_victim, self.matched_dim)

    @functools.cached_property
    def fixed(self) -> dict[str, torch.Tensor]:
        """The other weights and buffers, likewise (`fixed_dim`)."""
        return self._per_row(self._fixed_by_victim, self.fixed_dim)

    def _per_row(self, dicts: list[dict[str, torch.Tensor]], dim: int | None) -> dict[str, torch.Tensor]:
        """Stacked on first use only: the engines that run each victim's own model never need the copy."""
        if dim is None:
            return dicts[0]
        stacked = {n: torch.stack([d[n] for d in dicts]) for n in dicts[0]}
        return {n: t.repeat(self.restarts, *([1] * (t.dim() - 1))) for n, t in stacked.items()}

    def _build_step(self) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        model, loss_fn, vbs, tv_weight = self.model, self.loss_fn, self.vbs, self.config.tv_weight

        def client_loss(matched, x, y, fixed, noise):
            for name, vb in vbs.items():
                vb.noise = noise[name] if noise else None
            try:
                logits = functional_call(model, {**fixed, **matched}, (x,))
                return loss_fn(model, logits, y)
            finally:
                for vb in vbs.values():
                    vb.noise = None

        def objective(x, noise, matched, fixed, shared, shared_norm, y):
            g = grad(client_loss)(matched, x, y, fixed, noise)
            names = list(shared)
            distance = cosine_distance([g[n] for n in names], [shared[n] for n in names], shared_norm)
            total = distance + tv_weight * total_variation(x) if tv_weight > 0 else distance
            return total, distance

        self.generic_objective = objective  # the per-row objective every engine computes (benchmarks force vmap)
        small = sum(p.numel() for p in self.model.parameters()) <= VMAP_MAX_PARAMETERS
        if layerwise.supports(self.model):
            groups = self.weight_groups()
            if len(groups) <= LAYERWISE_MAX_WEIGHT_GROUPS or not small or self.rows == 1:
                self.engine = "layerwise"
                self.restrictable = True
                return self._layerwise_step(groups)
        if self.rows == 1:
            self.engine = "autograd"
            return self._single_step()
        if not small or self.bn_prior is not None:
            self.engine = "looped"  # also for ig-bn, whose prior reads each row's BatchNorm inputs through hooks
            self.restrictable = True
            return self._looped_step()
        self.engine = "vmap"
        return self.vmapped_step(objective)

    def weight_groups(self) -> list[list[int]]:
        """The victims, grouped by the weights (parameters and buffers) their dumps carry, in order."""
        if self.matched_dim is None and self.fixed_dim is None:
            return [list(range(self.victims))]
        states = [[*model.parameters(), *model.buffers()] for model in self.models]
        # A sum per tensor sorts the victims cheaply (equal weights give equal sums); equality is then
        # confirmed against each group's first, so V distinct models cost O(V), not O(V^2), passes.
        fingerprints = [tuple(float(t.detach().sum()) for t in state) for state in states]
        groups: list[list[int]] = []
        for v, state in enumerate(states):
            for group in groups:
                first = group[0]
                if fingerprints[first] == fingerprints[v] and all(torch.equal(a, b) for a, b in zip(state, states[first])):
                    group.append(v)
                    break
            else:
                groups.append([v])
        return groups

    def _layerwise_step(self, groups: list[list[int]] | None = None) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        """The layer-by-layer engine, one objective per group of victims that share weights.

        Dumps that carry their own weights (other epochs or rounds) are matched group by group, each
        through its own model: on large models the generic engines are many times slower per victim
        than attacking those victims one by one with this engine.
        """
        objectives = []
        for victims in groups or self.weight_groups():
            rows = torch.tensor([r * self.victims + v for r in range(self.restarts) for v in victims],
                                device=self.device)
            model = self.models[victims[0]]
            objective = layerwise.LayerwiseObjective(
                model, self.loss_fn, self.matched, {n: g[rows] for n, g in self.shared.items()},
                self.shared_norm[rows], self.labels[rows], self.config.tv_weight, bottlenecks(model),
                victims=len(victims), low_rank=self.config.low_rank)
            objectives.append((rows, objective))
        self.layerwise = objectives[0][1]  # kept for inspection: which gradients it matches through factors
        self.layerwise_groups = objectives
        if len(objectives) == 1:
            return self._one_group_step(objectives[0][1])
        return self._grouped_step(objectives)

    def _one_group_step(self, by_layer: layerwise.LayerwiseObjective) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        """Every victim shares the weights: one objective over all rows (a subset after early stops)."""
        leaves = [self.inputs] + list(self.noise.values())
        restricted: dict[str, Any] = {}  # the objective of the running rows, rebuilt when they change

        def step() -> tuple[list[torch.Tensor], torch.Tensor]:
            objective = by_layer
            if self.active is not None:
                if restricted.get("rows") is not self.active:
                    restricted.update(rows=self.active, objective=by_layer.subset(self.active))
                objective = restricted["objective"]
            noise = self.take_noise(self.noise or self.replay_noise())
            return objective(self.take(self.inputs), noise, leaves)

        return step

    def _grouped_step(self, objectives: list) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        """One objective per weight group, each on its own rows as fresh leaves; results scattered back."""
        restricted: dict[str, Any] = {}  # per group: (its running rows, their objective), rebuilt on change

        def running() -> list[tuple[torch.Tensor, layerwise.LayerwiseObjective]]:
            if self.active is None:
                return objectives
            if restricted.get("rows") is not self.active:
                parts = []
                for rows, objective in objectives:
                    keep = torch.isin(rows, self.active)
                    if keep.any():
                        parts.append((rows[keep], objective.subset(keep.nonzero().flatten())))
                restricted.update(rows=self.active, parts=parts)
            return restricted["parts"]

        def step() -> tuple[list[torch.Tensor], torch.Tensor]:
            return self._scattered(running(), lambda objective, images, noise, leaves: objective(
                images.view_as(images), noise, leaves))

        return step

    def _scattered(self, pieces: list[tuple[Any, Any]], compute: Callable) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One step computed piece by piece: each (rows, what) piece gets its rows' images (and optimised
        noise) as fresh leaves, `compute(what, images, noise, leaves) -> (leaves' gradients, distances)`
        runs on them alone, and the results go back into full-size gradients (zero for the other rows)."""
        replayed = None if self.noise else self.replay_noise()
        input_grad = torch.zeros_like(self.inputs)
        noise_grads = {n: torch.zeros_like(t) for n, t in self.noise.items()}
        distances = torch.zeros(self.rows, device=self.inputs.device)
        for rows, what in pieces:
            images = self.inputs[rows].detach().requires_grad_(True)
            optimised = {n: t[rows].detach().requires_grad_(True) for n, t in self.noise.items()}
            noise = optimised or ({n: t[rows] for n, t in replayed.items()} if replayed else None)
            grads, distance = compute(what, images, noise, [images, *optimised.values()])
            input_grad[rows] = grads[0]
            for name, g in zip(optimised, grads[1:]):
                noise_grads[name][rows] = g
            distances[rows] = distance
        return [input_grad, *noise_grads.values()], self.take(distances)

    def _looped_step(self) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        """Every running row in turn with plain autograd, as attacking the victims one by one would (large
        models, where vmap's memory traffic cost more than vectorising saved); the same values as vmap.

        Each row is its own small graph: its image (and noise) are fresh leaves, so a row's backward pass
        never touches the other rows. Each row runs its victim's own model with its own parameters, as
        attacking it alone does (one model for all when the victims share weights).
        """
        tv_weight, names = self.config.tv_weight, list(self.matched)
        shared_weights = self.matched_dim is None and self.fixed_dim is None
        models = [self.model] if shared_weights else self.models
        weights = [[dict(m.named_parameters())[n] for n in names] for m in models]
        vbs = [bottlenecks(m) for m in models]

        def row_loss(model: int, r: int, x: torch.Tensor, noise: dict[str, torch.Tensor] | None) -> torch.Tensor:
            """Row r's client loss through victim model `model`, with this row's noise in its bottlenecks."""
            for name, vb in vbs[model].items():
                vb.noise = noise[name] if noise else None
            try:
                return self.loss_fn(models[model], models[model](x), self.labels[r])
            finally:
                for vb in vbs[model].values():
                    vb.noise = None

        def one_row(r: int, image: torch.Tensor, noise: dict[str, torch.Tensor] | None,
                    leaves: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
            x = image.view_as(image)  # not a leaf itself: module hooks may not see leaves under autograd.grad
            model = 0 if shared_weights else r % self.victims
            with self.watching_bn(models[model]) as bn_inputs:
                loss = row_loss(model, r, x, noise)
            grads = torch.autograd.grad(loss, weights[model], create_graph=True)
            distance = cosine_distance(list(grads), [self.shared[n][r] for n in names], self.shared_norm[r])
            total = distance + tv_weight * total_variation(x) if tv_weight > 0 else distance
            total = self.with_bn_prior(total, bn_inputs, r)
            return torch.autograd.grad(total, leaves), distance.detach()

        def step() -> tuple[list[torch.Tensor], torch.Tensor]:
            rows = range(self.rows) if self.active is None else self.active.tolist()
            return self._scattered([(r, r) for r in rows], one_row)

        return step

    def vmapped_step(self, objective: Callable) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        """A step that evaluates `objective(x, noise, matched, fixed, shared, shared_norm, y) -> (total,
        distance)` for every row with `vmap` of `grad`, returning the variables' gradients and distances."""
        argnums = (0, 1) if self.noise else 0
        dims = (0, 0 if (self.noise or self.replay) else None, self.matched_dim, self.fixed_dim, 0, 0, 0)
        vectorised = vmap(grad(objective, argnums=argnums, has_aux=True), in_dims=dims, randomness="different")
        self.restrictable = True
        restricted: dict[str, Any] = {}  # the per-row arguments of the running rows, rebuilt when they change

        def per_row_arguments() -> tuple:
            everything = (self.matched_params, self.fixed, self.shared, self.shared_norm, self.labels)
            if self.active is None:
                return everything
            if restricted.get("rows") is not self.active:
                def rows_of(values: Any, dim: int | None) -> Any:
                    if dim is None:
                        return values
                    if isinstance(values, dict):
                        return {name: value[self.active] for name, value in values.items()}
                    return values[self.active]

                dims = (self.matched_dim, self.fixed_dim, 0, 0, 0)
                restricted.update(rows=self.active,
                                  arguments=tuple(rows_of(v, d) for v, d in zip(everything, dims)))
            return restricted["arguments"]

        def step() -> tuple[list[torch.Tensor], torch.Tensor]:
            noise = self.take_noise(self.noise or self.replay_noise())
            grads, distance = vectorised(self.take(self.inputs), noise, *per_row_arguments())
            if self.noise:
                input_grad, noise_grads = grads
                return ([self.spread(input_grad, self.inputs)]
                        + [self.spread(noise_grads[n], self.noise[n]) for n in self.noise]), distance
            return [self.spread(grads, self.inputs)], distance

        return step

    def _single_step(self) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
        """One victim, one restart: the same objective with plain autograd, which is faster than vmap of one."""
        model, vbs, tv_weight = self.model, self.vbs, self.config.tv_weight
        named = dict(model.named_parameters())
        matched = [named[n] for n in self.matched]
        shared = [self.shared[n][0] for n in self.matched]
        leaves = [self.inputs] + list(self.noise.values())

        def step() -> tuple[list[torch.Tensor], torch.Tensor]:
            x = self.inputs[0]
            noise = self.noise or self.replay_noise()
            for name, vb in vbs.items():
                vb.noise = noise[name][0] if noise else None
            try:
                with self.watching_bn() as bn_inputs:
                    loss = self.loss_fn(model, model(x), self.labels[0])
            finally:
                for vb in vbs.values():
                    vb.noise = None
            grads = torch.autograd.grad(loss, matched, create_graph=True)
            distance = cosine_distance(list(grads), shared, self.shared_norm[0])
            total = distance + tv_weight * total_variation(x) if tv_weight > 0 else distance
            total = self.with_bn_prior(total, bn_inputs, 0)
            return list(torch.autograd.grad(total, leaves)), distance.detach().view(1)

        return step

    def step(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self._step()

    def watching_bn(self, model: nn.Module | None = None) -> contextlib.AbstractContextManager[dict[str, list[torch.Tensor]]]:
        """Collects the BatchNorm layers' inputs of the forward pass of `model` (default: the first victim's)
        inside it for ig-bn's prior; else nothing."""
        return self.bn_prior.watching(model) if self.bn_prior is not None else contextlib.nullcontext({})

    def with_bn_prior(self, total: torch.Tensor, bn_inputs: dict[str, list[torch.Tensor]], row: int) -> torch.Tensor:
        """`total` plus ig-bn's weighted BatchNorm prior of `row` (not in the loss trace, like TV); else `total`."""
        if self.bn_prior is None:
            return total
        return total + self.config.bn_weight * self.bn_prior.penalty(bn_inputs, row)

    def outcome(self, traces: torch.Tensor, finished: int, state: MatchState | None,
                stopped: torch.Tensor | None = None, skipped: torch.Tensor | None = None) -> MatchOutcome:
        """The best restart of every victim, judged by its last matching loss (where it stopped, if early)."""
        traces = traces.cpu()
        stopped = torch.full((self.rows,), -1, dtype=torch.long) if stopped is None else stopped
        if finished == 0:
            final = torch.full((self.rows,), float("inf"))
        else:
            last = torch.where(stopped >= 0, stopped, torch.tensor(finished)) - 1
            final = traces[torch.arange(self.rows), last]
        per_restart = final.view(self.restarts, self.victims)
        best = per_restart.argmin(dim=0)
        rows = best * self.victims + torch.arange(self.victims)
        return MatchOutcome(
            inputs=self.inputs.detach()[rows.to(self.device)].cpu(), traces=traces[rows].clone(),
            restart_losses=per_restart.t().clone(), finished=finished, state=state, stopped=stopped[rows].clone(),
            skipped=None if skipped is None else skipped.cpu()[rows].clone(),
        )


def _disable_running_stats(model: nn.Module) -> None:
    """In train mode BatchNorm normalises with the batch's statistics; stop it also updating buffers.

    The forward result is the same, and a vectorised pass may not write to shared buffers.
    """
    if not model.training:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None


ADAM_SLOTS = ("step", "exp_avg", "exp_avg_sq")


def _check_state(state: MatchState, problem: _Problem, optimizer: torch.optim.Optimizer, iterations: int) -> None:
    """A stored attack state must fit this run exactly: every tensor's name and shape, and one step count.

    The file's schema has already bounded `step`; here it must agree with the Adam state, and every
    tensor with the dumps, restarts and noise variables of this run. Anything else is refused.
    """
    def refuse(why: str) -> None:
        raise UserError(f"the attack checkpoint does not match this run ({why}); start over with --force.")

    tensors, step = state.tensors, state.step
    if not 0 <= step <= iterations:
        refuse(f"step {step} is outside 0..{iterations}")
    if tensors["inputs"].shape != problem.inputs.shape:
        refuse(f"inputs of shape {list(tensors['inputs'].shape)}, this run has {list(problem.inputs.shape)}")
    trace = tensors["traces"]
    if trace.dim() != 2 or trace.shape[0] != problem.rows or not step <= trace.shape[1] <= iterations:
        refuse(f"a loss trace of shape {list(trace.shape)}")
    expected = {f"noise.{name}": tuple(noise.shape) for name, noise in problem.noise.items()}
    expected.update({f"rng.replay.{r}": tuple(g.get_state().shape) for r, g in enumerate(problem.replay)})
    variables = [problem.inputs] + list(problem.noise.values())
    for index, variable in enumerate(variables):
        expected.update({f"adam.{index}.{slot}": tuple(variable.shape) for slot in ADAM_SLOTS[1:]})
        expected[f"adam.{index}.step"] = ()
    stopped = tensors.get("stopped")
    if stopped is not None and (stopped.shape != (problem.rows,) or bool((stopped < -1).any())
                                or bool((stopped > step).any())):
        refuse("its record of rows stopped early does not fit")
    skipped = tensors.get("skipped")
    if skipped is not None and (skipped.shape != (problem.rows,) or bool((skipped < 0).any())
                                or bool((skipped > step).any())):
        refuse("its count of skipped steps does not fit")
    present = {name for name in tensors if name not in ("inputs", "traces", "rng", "stopped", "skipped")}
    if step == 0:  # no Adam step taken yet: no Adam state
        expected = {k: v for k, v in expected.items() if not k.startswith("adam.")}
    if present != set(expected):
        odd = sorted(present ^ set(expected))[0]
        refuse(f"tensor {odd[:60]!r} is {'unexpected' if odd in present else 'missing'}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            refuse(f"tensor {name!r} has shape {list(tensors[name].shape)}, not {list(shape)}")
        if name.endswith(".step") and float(tensors[name]) != step:
            refuse(f"the optimiser took {float(tensors[name]):g} steps, the checkpoint says {step}")


def _initial_inputs(shape: tuple[int, ...], init: str, lower: torch.Tensor, upper: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """A restart's starting point, drawn from its own generator: the same for a victim alone or in a batch."""
    if init == "randn":
        return torch.randn(*shape, generator=generator)
    if init == "rand":
        return lower + (upper - lower) * torch.rand(*shape, generator=generator)
    if init == "zeros":
        return torch.zeros(*shape)
    raise UserError(f"unknown --init {init!r}; choose one of: {', '.join(INITS)}.")


def _state(step: int, problem: _Problem, optimizer: torch.optim.Optimizer, traces: LossTrace,
           stops: EarlyStops, skipped: NonFiniteSteps) -> MatchState:
    tensors = {"inputs": problem.inputs.detach().to("cpu", copy=True), "traces": traces.upto(step).to("cpu", copy=True),
               "rng": torch.get_rng_state()}
    if bool((stops.at >= 0).any()):
        tensors["stopped"] = stops.at.clone()
    if bool((skipped.count > 0).any()):
        tensors["skipped"] = skipped.count.cpu().clone()
    for name, noise in problem.noise.items():
        tensors[f"noise.{name}"] = noise.detach().clone()
    for r, generator in enumerate(problem.replay):
        tensors[f"rng.replay.{r}"] = generator.get_state()
    for index, slots in optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            tensors[f"adam.{index}.{slot}"] = torch.as_tensor(value).clone()
    return MatchState(step=step, tensors=tensors)


def _restore(state: MatchState, problem: _Problem, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, traces: LossTrace) -> int:
    _check_state(state, problem, optimizer, traces.limit)
    tensors = state.tensors
    with torch.no_grad():
        problem.inputs.copy_(tensors["inputs"])
        for name, noise in problem.noise.items():
            noise.copy_(tensors[f"noise.{name}"])
    for r, generator in enumerate(problem.replay):
        generator.set_state(tensors[f"rng.replay.{r}"])
    traces.load(tensors["traces"][:, : state.step])
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, slot = key.split(".", 2)
            slots.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": slots, "param_groups": optimizer.state_dict()["param_groups"]})
    decays = sum(1 for m in scheduler.milestones.elements() if m <= state.step)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scheduler.gamma ** decays
    scheduler.last_epoch = state.step
    torch.set_rng_state(tensors["rng"])
    return state.step
