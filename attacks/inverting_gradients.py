"""Inverting Gradients (Geiping et al., NeurIPS 2020) and its adaptive variants against PRECODE.

Cosine distance between the dummy's gradient and the shared gradient, plus total variation; Adam
on the sign of the input gradient; pixels boxed to the valid range; lr x0.1 at 3/8, 5/8 and 7/8 of
the iterations; labels from the dump, else read off the output-bias gradient. Three presets:

    precode  the PRECODE paper's settings: lr 0.01, 7000 iterations, TV 1e-6 (the default)
    geiping  the Inverting Gradients paper's CIFAR settings: lr 0.1, 24,000 iterations, TV 1e-4
    fast     the paper's step size and prior, 1000 iterations, and an early stop: every 100 iterations
             a victim whose best matching loss improved by less than 1% leaves the batch (`converged`)

`ig-adaptive` leaves PRECODE's decoder and every later layer out of the distance: their gradients
depend on the bottleneck's fresh noise, the earlier layers' mostly on the input. `ig-noise`
optimises the bottleneck's noise sample jointly with the input instead.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Callable

import torch

from attacks.base import Attack, AttackResult, AttackTarget, Progress
from attacks.labels import labels_from_bias_gradient, mean_softmax_on_noise, output_bias_name
from attacks.optimization import (
    INITS, MatchingConfig, MatchOutcome, MatchState, check_resume_state, match_gradients, matched_names,
)
from precode_cli.errors import UserError

PRESETS = {
    "precode": MatchingConfig(iterations=7000, lr=0.01, tv_weight=1e-6),
    "geiping": MatchingConfig(iterations=24_000, lr=0.1, tv_weight=1e-4),
    "fast": MatchingConfig(iterations=1000, lr=0.01, tv_weight=1e-6, patience=100, min_improvement=0.01),
}


class InvertingGradients(Attack):
    """`--method ig`."""

    name = "ig"
    vectorised = True

    def __init__(
        self,
        iterations: int | None = None,
        lr: float | None = None,
        tv_weight: float | None = None,
        preset: str | None = None,
        restarts: int | None = None,
        init: str | None = None,
        ignore_layers: list[str] | None = None,
        patience: int | None = None,
        min_improvement: float | None = None,
    ) -> None:
        preset = preset or "precode"
        if preset not in PRESETS:
            raise UserError(f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
        chosen = {"iterations": iterations, "lr": lr, "tv_weight": tv_weight, "restarts": restarts, "init": init,
                  "ignore": tuple(ignore_layers) if ignore_layers else None, "patience": patience,
                  "min_improvement": min_improvement}
        config = replace(PRESETS[preset], **{k: v for k, v in chosen.items() if v is not None})
        if config.iterations < 1:
            raise UserError(f"--iterations must be at least 1, not {config.iterations}.")
        if not config.lr > 0:  # also refuses NaN
            raise UserError(f"--lr must be positive, not {config.lr}.")
        if not config.tv_weight >= 0:
            raise UserError(f"--tv-weight must be non-negative, not {config.tv_weight}.")
        if config.restarts < 1:
            raise UserError(f"--restarts must be at least 1, not {config.restarts}.")
        if config.patience < 0:
            raise UserError(f"--patience must be 0 (never stop early) or more, not {config.patience}.")
        if not 0 <= config.min_improvement < 1:
            raise UserError(f"--min-improvement must be at least 0 and below 1, not {config.min_improvement}.")
        if config.init not in INITS:
            raise UserError(f"unknown --init {config.init!r}; choose one of: {', '.join(INITS)}.")
        self.preset = preset
        self.config = config

    @property
    def iterations(self) -> int:
        return self.config.iterations

    def params(self) -> dict[str, Any]:
        params = asdict(self.config)
        params.pop("progress_every")
        params.pop("low_rank")  # how the objective is computed, not what it is
        if not params["patience"]:  # no early stop: the settings read as they did before there was one
            params.pop("patience")
            params.pop("min_improvement")
        if not params["bn_weight"]:  # no BatchNorm prior (every method but ig-bn): as before there was one
            params.pop("bn_weight")
        params["lr_decay_at"] = list(params["lr_decay_at"])
        params["ignore_layers"] = list(params.pop("ignore"))
        params["preset"] = self.preset
        params["distance"] = "cosine"
        return params

    def config_for(self, target: AttackTarget) -> MatchingConfig:
        """The settings for one target's architecture (the adaptive variants look at the model)."""
        return self.config

    def check(self, target: AttackTarget) -> None:
        matched_names(target.param_names, self.config_for(target).ignore)
        resolve_labels(target)

    def run(self, target: AttackTarget, seed: int, progress: Progress | None = None) -> AttackResult:
        return self.run_many([target], seed, progress)[0]

    def check_resume(self, targets: list[AttackTarget], state: MatchState, seed: int) -> None:
        """Refuse a stored state that does not fit these targets and this attack's settings."""
        labels = [resolve_labels(t)[0] for t in targets]
        check_resume_state(targets, labels, self.config_for(targets[0]), seed, state)

    def run_many(
        self,
        targets: list[AttackTarget],
        seed: int,
        progress: Progress | None = None,
        *,
        resume: MatchState | None = None,
        checkpoint: Callable[[MatchState], None] | None = None,
        checkpoint_every: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[AttackResult]:
        """Attack targets of one architecture and batch size together; each gets what it would alone.

        After an early stop `last_outcome.state` holds what `resume` needs to continue.
        """
        resolved = [resolve_labels(t) for t in targets]
        outcome = match_gradients(targets, [labels for labels, _ in resolved], self.config_for(targets[0]), seed,
                                  progress, resume=resume, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                                  should_stop=should_stop)
        self.last_outcome: MatchOutcome = outcome
        config = self.config_for(targets[0])
        results = []
        for i, (labels, source) in enumerate(resolved):
            stopped = int(outcome.stopped[i]) if outcome.stopped is not None else -1
            skipped = int(outcome.skipped[i]) if outcome.skipped is not None else 0
            notes = []
            if stopped >= 0:
                notes.append(f"stopped early after {stopped} of {config.iterations} iterations: its best matching "
                             f"loss improved by less than {config.min_improvement:g} (relative) over the last "
                             f"{config.patience} iterations")
            if skipped:
                notes.append(f"the matching loss was not finite in {skipped} iteration(s), which were skipped (the "
                             "images stayed where they were; the loss trace repeats the previous loss)")
            done = stopped if stopped >= 0 else outcome.finished
            results.append(AttackResult(inputs=outcome.inputs[i], labels=labels, label_source=source,
                                        loss_trace=outcome.traces[i, :done], stopped_at=stopped if stopped >= 0 else None,
                                        note="; ".join(notes) or None))
        return results


def resolve_labels(target: AttackTarget) -> tuple[torch.Tensor, str]:
    """Labels shared in the dump, else the ones read off the output-bias gradient."""
    if target.labels is not None:
        return target.labels, "dump"
    shapes = [g.shape for g in target.shared_grads]
    name = output_bias_name(target.param_names, shapes, target.num_classes)
    if name is None:
        raise UserError("the dump carries no labels and the model has no output bias to read them from.")
    bias_grad = target.shared_grads[target.param_names.index(name)]
    probe = mean_softmax_on_noise(target.model, target.input_shape) if target.batch_size > 1 else None
    return labels_from_bias_gradient(bias_grad.cpu(), target.batch_size, probe).to(bias_grad.device), "recovered"
