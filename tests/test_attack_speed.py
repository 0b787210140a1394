"""The attack engine's shortcuts keep its answers: exact low-rank matching and the per-victim early stop.

Low-rank matching (attacks.low_rank) must give the same objective and input gradient as reading the
shared gradient whole, to float precision, and must fall back when a defense made the gradient full
rank. The early stop (`converged`) must stop exactly the victims its rule names, record when, cost
nothing after, and keep the property that a victim attacked with others gets what it gets alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from attacks.base import AttackTarget
from attacks.inverting_gradients import InvertingGradients
from attacks.low_rank import TOLERANCE, factorize
from attacks.optimization import MatchingConfig, converged, make_problem, match_gradients
from helpers import assert_one_line_error, invoke, invoke_ok
from precode_cli import fileformat
from test_attack_suite import make_target, plain_loss, precode_loss, stop_after, tiny_mlp, tiny_precode


@pytest.fixture(autouse=True)
def _fixed_weights():
    torch.manual_seed(0)


def test_the_tolerance_is_pinned():
    assert TOLERANCE == 1e-5


def test_a_sum_of_outer_products_is_factorised_exactly_and_a_noised_one_is_not():
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(3, 64, generator=generator), torch.randn(3, 200, generator=generator)
    matrix = left.t() @ right  # rank 3, as a Linear weight gradient of a batch of 3
    factors = factorize(matrix, rank=3)
    assert factors is not None
    u, v = factors
    assert u.shape == (64, 7) and v.shape == (200, 7)
    assert torch.linalg.matrix_norm(u @ v.t() - matrix) <= TOLERANCE * torch.linalg.matrix_norm(matrix)
    noised = matrix + 1e-3 * matrix.abs().mean() * torch.randn(matrix.shape, generator=generator)
    assert factorize(noised, rank=3) is None
    assert factorize(matrix, rank=3) is not None and factorize(torch.zeros(64, 200), rank=3) is None
    assert factorize(torch.randn(6, 5, generator=generator), rank=1) is None  # factors would be no smaller


def _objective_both_ways(targets: list[AttackTarget]):
    labels = [t.labels for t in targets]
    results = []
    for low_rank in (True, False):
        torch.manual_seed(0)
        problem = make_problem(targets, labels, MatchingConfig(low_rank=low_rank), seed=0)
        assert problem.engine == "layerwise"
        torch.manual_seed(0)
        grads, distance = problem.step()
        results.append((problem, grads[0], distance))
    return results


def test_low_rank_matching_gives_the_full_objective_to_float_precision():
    model = tiny_mlp()
    targets = [make_target(model, plain_loss, seed=10 + v, labels=[v, (v + 3) % 10])[0] for v in range(3)]
    (factored, g1, d1), (whole, g0, d0) = _objective_both_ways(targets)
    assert set(factored.layerwise.factors) == {"1.weight", "3.weight"} and not whole.layerwise.factors
    assert torch.allclose(d1, d0, rtol=1e-5, atol=1e-7)
    assert torch.allclose(g1, g0, rtol=1e-4, atol=1e-6 * float(g0.abs().max()))
    assert not torch.equal(d1, torch.zeros_like(d1))


def test_low_rank_matching_falls_back_when_noise_made_the_gradient_full_rank():
    model = tiny_mlp()
    target = make_target(model, plain_loss, seed=3, labels=[4])[0]
    generator = torch.Generator().manual_seed(1)
    noised = [g + 1e-2 * torch.randn(g.shape, generator=generator) for g in target.shared_grads]
    target.shared_grads = noised
    (factored, _, d1), (_, _, d0) = _objective_both_ways([target])
    assert factored.layerwise.factors == {}
    assert torch.equal(d1, d0)


def test_a_whole_attack_through_the_factors_ends_where_the_full_objective_does():
    """300 signed-Adam steps amplify rounding differences; the two runs still end together."""
    model = tiny_mlp()
    target = make_target(model, plain_loss, seed=5, labels=[2])[0]
    ends = {}
    for low_rank in (True, False):
        config = MatchingConfig(iterations=300, lr=0.1, low_rank=low_rank)
        ends[low_rank] = match_gradients([target], [target.labels], config, seed=0)
    assert (ends[True].inputs - ends[False].inputs).abs().max() < 1e-3
    assert (ends[True].traces - ends[False].traces).abs().max() < 1e-4


def test_the_early_stop_rule_on_hand_made_traces():
    traces = torch.tensor([
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.5],  # still improving: 0.5 is far below 2
        [5.0, 1.0, 1.0, 1.0, 0.999, 0.995],  # a plateau: the best of the last 2 (0.995) is < 1% below 1.0
        [5.0, 1.0, 3.0, 3.0, 2.0, 2.0],  # worse than before
    ])
    assert converged(traces, 6, patience=2, min_improvement=0.01).tolist() == [False, True, True]
    assert not converged(traces, 3, patience=2, min_improvement=0.01).any()  # not a multiple of the patience
    assert not converged(traces, 2, patience=2, min_improvement=0.01).any()  # no window before the last one
    assert not converged(traces, 6, patience=0, min_improvement=0.01).any()  # 0: never


def _defended(count: int = 2) -> list[AttackTarget]:
    """Victims of a tiny PRECODE MLP: ig's matching loss stalls early on them."""
    model = tiny_precode()
    return [make_target(model, precode_loss, seed=30 + v, labels=[v])[0] for v in range(count)]


EARLY = {"iterations": 200, "lr": 0.1, "patience": 20, "min_improvement": 0.05}


def test_early_stop_records_when_and_why_and_keeps_victims_independent():
    targets = _defended()
    attack = InvertingGradients(**EARLY)
    together = attack.run_many(targets, seed=0)
    stopped = attack.last_outcome.stopped
    assert (stopped >= 0).any()  # PRECODE's victims plateau
    for v, target in enumerate(targets):
        alone = attack.run_many([target], seed=0)[0]
        assert alone.stopped_at == together[v].stopped_at
        assert torch.allclose(together[v].inputs, alone.inputs, atol=1e-4, rtol=0), v
        result = together[v]
        if result.stopped_at is not None:
            assert result.stopped_at % 20 == 0 and 40 <= result.stopped_at < 200
            assert len(result.loss_trace) == result.stopped_at == int(stopped[v])
            assert "stopped early after" in result.note and "0.05" in result.note
        else:
            assert len(result.loss_trace) == 200 and result.note is None
    # The paper's preset never stops early.
    paper = InvertingGradients(iterations=200, lr=0.1).run_many(targets[:1], seed=0)[0]
    assert paper.stopped_at is None and len(paper.loss_trace) == 200


def test_a_restricted_problem_computes_only_the_running_rows_and_the_same_values():
    targets = _defended(3)
    labels = [t.labels for t in targets]
    full, part = (make_problem(targets, labels, MatchingConfig(), seed=0) for _ in range(2))
    part.restrict(torch.tensor([0, 2]))
    grads_full, distance_full = full.step()
    grads_part, distance_part = part.step()
    assert distance_part.shape == (2,)
    assert torch.allclose(distance_part, distance_full[[0, 2]], rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(grads_part[0][1]) == 0  # the stopped row gets no gradient
    assert torch.allclose(grads_part[0][[0, 2]], grads_full[0][[0, 2]], rtol=1e-4, atol=1e-7)


def test_an_interrupted_run_with_stopped_rows_resumes_exactly():
    targets = _defended()
    labels = [t.labels for t in targets]
    config = MatchingConfig(**EARLY)
    whole = match_gradients(targets, labels, config, seed=0)
    first_stop = int(whole.stopped[whole.stopped >= 0].min())
    part = match_gradients(targets, labels, config, seed=0, should_stop=stop_after(first_stop + 10))
    assert part.state is not None and "stopped" in part.state.tensors
    resumed = match_gradients(targets, labels, config, seed=0, resume=part.state)
    assert torch.equal(resumed.stopped, whole.stopped)
    assert torch.allclose(resumed.inputs, whole.inputs, atol=1e-6, rtol=0)


def test_the_fast_preset_records_its_stops_in_the_reconstruction(tmp_path):
    grads, recon = tmp_path / "grads", tmp_path / "recon"
    invoke_ok("capture-gradients", "--model", "mlp", "--defense", "precode", "--width", 32, "--image-size", 8,
              "--indices", "0:2", "--seed", 0, "--out", grads)
    invoke_ok("attack", grads, "--preset", "fast", "--iterations", 200, "--lr", 0.1, "--patience", 20, "--seed", 0,
              "--out", recon)
    metas = [fileformat.read(path, "reconstruction") for path in sorted(recon.glob("*.safetensors"))]
    assert len(metas) == 2
    for read in metas:
        attack = read.meta["attack"]
        assert attack["params"]["patience"] == 20 and attack["params"]["min_improvement"] == 0.01
        assert attack["params"]["preset"] == "fast" and attack["params"]["iterations"] == 200
        assert attack["completed"]
        if "stopped_at" in attack:
            assert attack["iterations_done"] == attack["stopped_at"] == len(read.tensors["loss_trace"])
            assert attack["stopped_at"] % 20 == 0 and "stopped early" in attack["note"]
    assert any("stopped_at" in read.meta["attack"] for read in metas)
    invoke_ok("evaluate", recon, "--truth", grads, "--out", tmp_path / "report")


def normed_precode() -> torch.nn.Module:
    """A model the layer-by-layer engine does not serve (LayerNorm has weights of its own)."""
    from defenses.precode import insert_vb
    from test_attack_suite import SHAPE
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(SHAPE), 32), torch.nn.LayerNorm(32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return insert_vb(model, SHAPE, k=8)


def test_large_models_loop_over_rows_with_the_same_values(monkeypatch):
    """Dumps with different weights of a model layerwise does not serve take the generic engine: vmap for
    small models, a loop for large ones."""
    import attacks.optimization as optimization

    targets = []
    for v in range(3):
        torch.manual_seed(v)  # other weights per victim
        targets.append(make_target(normed_precode(), precode_loss, seed=40 + v, labels=[v])[0])
    labels = [t.labels for t in targets]
    steps = {}
    for limit in (10**9, 0):
        monkeypatch.setattr(optimization, "VMAP_MAX_PARAMETERS", limit)
        problem = make_problem(targets, labels, MatchingConfig(), seed=0)
        steps[problem.engine] = problem.step()
    assert set(steps) == {"vmap", "looped"}  # looped: plain autograd, one row after another
    (g_vmap, d_vmap), (g_loop, d_loop) = steps["vmap"], steps["looped"]
    assert torch.allclose(d_vmap, d_loop, rtol=1e-5, atol=1e-7)
    assert torch.allclose(g_vmap[0], g_loop[0], rtol=1e-4, atol=1e-6 * float(g_vmap[0].detach().abs().max()))


def engine_steps(targets, config: MatchingConfig, engines: dict, active: torch.Tensor | None = None) -> dict:
    """One step of each named engine, each on a fresh problem (the same starts and replayed draws)."""
    labels = [t.labels for t in targets]
    steps = {}
    for name, build in engines.items():
        problem = make_problem(targets, labels, config, seed=0)
        problem._step = build(problem)
        problem.restrict(active)
        steps[name] = problem.step()
    return steps


def assert_same_step(first, second) -> None:
    (g_a, d_a), (g_b, d_b) = first, second
    assert torch.allclose(d_a, d_b, rtol=1e-5, atol=1e-7)
    assert len(g_a) == len(g_b)
    for a, b in zip(g_a, g_b):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.detach().abs().max()))


@pytest.mark.parametrize("optimize_noise", [False, True], ids=["replayed-noise", "optimised-noise"])
def test_victims_with_their_own_weights_are_matched_layer_by_layer_group_by_group(optimize_noise):
    """Dumps of other epochs carry other weights: the layer-by-layer engine takes each group of victims
    that share weights through its own model, and gives vmap's values on every row and on a subset."""
    torch.manual_seed(1)
    first, second = tiny_precode(), tiny_precode()
    targets = [make_target(model, precode_loss, seed=70 + v, labels=[v])[0]
               for v, model in enumerate([first, second, first])]
    config = MatchingConfig(optimize_noise=optimize_noise, restarts=2)
    problem = make_problem(targets, [t.labels for t in targets], config, seed=0)
    assert problem.engine == "layerwise" and problem.weight_groups() == [[0, 2], [1]]
    engines = {"vmap": lambda p: p.vmapped_step(p.generic_objective), "layerwise": lambda p: p._layerwise_step()}
    for active in (None, torch.tensor([1, 2, 3])):
        steps = engine_steps(targets, config, engines, active)
        assert_same_step(steps["vmap"], steps["layerwise"])
        if active is not None:
            assert steps["layerwise"][1].shape == (3,) and not steps["layerwise"][0][0][[0, 4, 5]].any()


def test_many_weight_groups_take_vmap_on_small_models_and_stay_layer_by_layer_on_large_ones(monkeypatch):
    import attacks.optimization as optimization

    torch.manual_seed(3)
    models = [tiny_mlp() for _ in range(optimization.LAYERWISE_MAX_WEIGHT_GROUPS + 1)]
    targets = [make_target(m, plain_loss, seed=90 + v, labels=[v])[0] for v, m in enumerate(models)]
    labels = [t.labels for t in targets]
    assert make_problem(targets, labels, MatchingConfig(), seed=0).engine == "vmap"
    assert make_problem(targets[:-1], labels[:-1], MatchingConfig(), seed=0).engine == "layerwise"
    monkeypatch.setattr(optimization, "VMAP_MAX_PARAMETERS", 0)
    assert make_problem(targets, labels, MatchingConfig(), seed=0).engine == "layerwise"


def test_a_victim_gets_the_same_with_others_of_other_weights_as_alone():
    torch.manual_seed(2)
    first, second = tiny_mlp(), tiny_mlp()
    targets = [make_target(m, plain_loss, seed=80 + v, labels=[v])[0] for v, m in enumerate([first, second])]
    config = MatchingConfig(iterations=30, lr=0.1)
    together = match_gradients(targets, [t.labels for t in targets], config, seed=0)
    for v, target in enumerate(targets):
        alone = match_gradients([target], [target.labels], config, seed=0)
        assert torch.allclose(together.inputs[v], alone.inputs[0], atol=1e-5)


@pytest.mark.parametrize("optimize_noise", [False, True], ids=["replayed-noise", "optimised-noise"])
def test_the_row_loop_on_shared_weights_matches_vmap_on_every_row_and_on_a_subset(optimize_noise):
    """Shared weights take the module's own parameters in the loop (no functional_call); every variable's
    gradient, the noise's too, and a restricted set of rows must agree with vmap's."""
    model = tiny_precode()
    targets = [make_target(model, precode_loss, seed=60 + v, labels=[v])[0] for v in range(3)]
    config = MatchingConfig(optimize_noise=optimize_noise, restarts=2)
    engines = {"vmap": lambda p: p.vmapped_step(p.generic_objective), "looped": lambda p: p._looped_step()}
    for active in (None, torch.tensor([1, 4, 5])):
        steps = engine_steps(targets, config, engines, active)
        assert_same_step(steps["vmap"], steps["looped"])
        g_loop, d_loop = steps["looped"]
        assert d_loop.shape == (6 if active is None else 3,) and len(g_loop) == (2 if optimize_noise else 1)
        if active is not None:  # the stopped rows get no gradient
            assert not g_loop[0][[0, 2, 3]].any()


def test_a_step_whose_loss_is_not_finite_is_skipped_and_said():
    """A replay that diverges (here: a loss made NaN on two calls) must not poison the images or the file."""
    model = tiny_mlp()
    target = make_target(model, plain_loss, seed=7, labels=[3])[0]
    calls = {"n": 0}

    def sometimes_nan(m, logits, labels):
        calls["n"] += 1
        loss = plain_loss(m, logits, labels)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    target.loss_fn = sometimes_nan
    attack = InvertingGradients(iterations=20, lr=0.1)
    result = attack.run_many([target], seed=0)[0]
    assert torch.isfinite(result.loss_trace).all() and torch.isfinite(result.inputs).all()
    assert result.loss_trace[2] == result.loss_trace[1] == result.loss_trace[3]  # skipped: previous loss repeated
    assert "not finite in 2 iteration(s)" in result.note and result.stopped_at is None
    assert int(attack.last_outcome.skipped[0]) == 2


def test_threads_are_chosen_and_recorded(tmp_path):
    grads, recon = tmp_path / "grads", tmp_path / "recon"
    invoke_ok("capture-gradients", "--model", "mlp", "--width", 16, "--image-size", 8, "--indices", "0:1",
              "--out", grads)
    before = torch.get_num_threads()
    try:
        invoke_ok("attack", grads, "--iterations", 2, "--threads", 1, "--out", recon)
        read = fileformat.read(next(recon.glob("*.safetensors")), "reconstruction")
        assert read.meta["attack"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert_one_line_error(invoke("attack", grads, "--threads", 0, "--out", tmp_path / "r0"), "--threads")


def test_a_checkpoint_with_a_forged_record_of_stops_or_skips_is_refused():
    """`stopped` and `skipped` come from a file: a wrong shape or an impossible value is one sentence."""
    from attacks.optimization import check_resume_state
    from precode_cli.errors import UserError

    targets = _defended()
    labels = [t.labels for t in targets]
    config = MatchingConfig(**EARLY)
    part = match_gradients(targets, labels, config, seed=0, should_stop=stop_after(30))
    for name, forged in [("stopped", torch.tensor([-1, -1, -1])), ("stopped", torch.tensor([500, -1])),
                         ("skipped", torch.tensor([-3, 0])), ("skipped", torch.tensor([31, 0]))]:
        state = type(part.state)(step=part.state.step, tensors={**part.state.tensors, name: forged})
        with pytest.raises(UserError, match="does not match this run"):
            check_resume_state(targets, labels, config, 0, state)
