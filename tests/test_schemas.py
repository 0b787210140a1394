"""Declared schemas, resource budgets and resumed state: a file from someone else is checked up front.

Real files of every kind are made once with the real commands (a tiny MLP on 8x8 images), then
changed the way an adversary would: every declared metadata field replaced by a value of the wrong
type, values out of range, fields that disagree with each other, tensors that disagree with the
metadata, states that do not fit the run they claim to continue. Every case must be one sentence
and exit 2 through the CLI, or a `UserError` from the reader, never anything else.
benchmarks/hostile_files.py runs the same classes through the CLI in subprocesses and measures
their memory and time.
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import DUMP0, TRUTH0, assert_one_line_error, invoke, invoke_ok, tree_digest
from precode_cli import budget, fileformat, schema_docs, schemas
from precode_cli.errors import UserError
from precode_cli.stages import attack as attack_stage
from precode_cli.stages import profiles
from precode_cli.cli_support import GracefulStop

TINY = ["--model", "mlp", "--width", 8, "--image-size", 8]
TRAIN = ["train", *TINY, "--epochs", 2, "--subset", 32, "--batch-size", 16, "--checkpoint-epochs", 1]
ATTACK_STATE = ["attack", "--iterations", 20, "--checkpoint-iterations", 5, "--seed", 0]


class StopAfter(GracefulStop):
    """Reports a Ctrl-C after 1 + 7 queries: the attack stops at step 7 and writes its state."""

    def __call__(self) -> bool:
        self.asked = getattr(self, "asked", 0) + 1
        return self.asked > 8


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One real file of every kind, made with the real commands, and the folders they live in."""
    root = tmp_path_factory.mktemp("kinds")
    run, grads, recon, stopped = root / "run", root / "grads", root / "recon", root / "stopped"
    invoke_ok(*TRAIN, "--out", run)
    invoke_ok("capture-gradients", run, "--epoch", 1, "--indices", "0:2", "--out", grads)
    invoke_ok("attack", grads, "--iterations", 3, "--out", recon)
    original = attack_stage.GracefulStop
    attack_stage.GracefulStop = StopAfter
    try:
        result = invoke(*ATTACK_STATE[:1], grads / DUMP0, *ATTACK_STATE[1:], "--out", stopped)
    finally:
        attack_stage.GracefulStop = original
    assert result.exit_code == 130, result.output
    return {
        "model": run / "model.safetensors", "training-state": run / "checkpoints" / "resume.safetensors",
        "gradients": grads / DUMP0, "truth": grads / TRUTH0, "reconstruction": recon / DUMP0,
        "attack-state": stopped / "checkpoints" / DUMP0, "run": run, "grads": grads, "recon": recon,
        "stopped": stopped,
    }


def load_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite(source: Path, target: Path, meta: dict[str, Any] | None = None,
            tensors: dict[str, torch.Tensor | None] | None = None) -> Path:
    """A copy of `source` with metadata values (JSON) and tensors replaced (None: dropped)."""
    raw_tensors, raw_meta = load_raw(source)
    if callable(tensors):
        tensors = tensors(raw_tensors)
    for key, value in (meta or {}).items():
        raw_meta[key] = json.dumps(value)
    for name, tensor in (tensors or {}).items():
        if tensor is None:
            raw_tensors.pop(name, None)
        else:
            raw_tensors[name] = tensor
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(raw_tensors, str(target), metadata=raw_meta)
    states = source.parent / "states"  # a version-2 dump's shared model state travels with it
    if "state" in raw_meta and states.is_dir() and target.parent != source.parent:
        shutil.copytree(states, target.parent / "states", dirs_exist_ok=True)
    return target


def _factors_of_batch(batch: int):
    """A tensor edit: every factored gradient's factors zero-padded to `batch` rows (rebuilding the same matrix),
    so that only what a test changes disagrees with a changed batch size."""
    def edit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: torch.cat([t, t.new_zeros(batch - t.shape[0], t.shape[1])])
                for name, t in tensors.items() if name.startswith("factor.")}
    return edit


def set_path(document: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    """A deep copy of `document` with the value at `path` (keys and list indices) replaced."""
    copy = json.loads(json.dumps(document))
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return copy


def leaves(value: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON document, containers and scalars alike."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += leaves(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            found += leaves(child, path + (index,))
    return found


def meta_of(path: Path) -> dict[str, Any]:
    _, raw = load_raw(path)
    return {k: json.loads(v) for k, v in raw.items() if k not in ("format", "format_version")}


KINDS = ("model", "training-state", "gradients", "truth", "reconstruction", "attack-state")


# --- 1. every kind has a declared schema, and real files pass it -----------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_real_files_of_every_kind_fit_their_schema(files, kind):
    stored = fileformat.read(files[kind], kind, profile=profiles.for_files())
    assert stored.meta == meta_of(files[kind])
    schemas.SCHEMAS[kind].model_validate(stored.meta)


def test_docs_field_tables_are_generated_from_the_schemas():
    assert schema_docs.documented() == schema_docs.markdown(), (
        "docs/file-format.md differs from the schemas; run `python -m precode_cli.schema_docs`")


# --- 2. every declared field, of the wrong type: refused, naming the field ------------------------

FREE_FORM = ("options", "privacy", "params", "kwargs", "tool")  # objects that may hold any keys, or have defaults


def declared_paths(kind: str, meta: dict[str, Any]) -> list[tuple]:
    """Paths of the real file's metadata whose field the schema declares with a fixed type."""
    declared = {row[0] for row in schema_docs._rows(schemas.SCHEMAS[kind].model_json_schema(),
                                                     schemas.SCHEMAS[kind].model_json_schema().get("$defs", {}), "")}
    shared = {f"{top}.{row[0]}" for top, schema in (("model", schemas.ModelSpec), ("data", schemas.BatchedData),
                                                   ("capture.tool", schemas.Tool), ("tool", schemas.Tool))
              for row in schema_docs._rows(schema.model_json_schema(), schema.model_json_schema().get("$defs", {}), "",
                                           top=True)}
    paths = []
    for path in leaves(meta):
        dotted = ".".join(str(p) if not isinstance(p, int) else "[]" for p in path).replace(".[]", "[]")
        if any(part in FREE_FORM for part in path if isinstance(part, str)) and not dotted.startswith("tool"):
            continue
        if dotted in declared or dotted in shared or dotted.startswith("defense"):
            paths.append(path)
    return paths


@pytest.mark.parametrize("kind", KINDS)
def test_every_declared_field_of_the_wrong_type_is_refused(files, kind, tmp_path):
    meta = meta_of(files[kind])
    paths = declared_paths(kind, meta)
    assert len(paths) >= 5, paths
    for path in paths:
        current = json.loads(json.dumps(meta))
        for part in path:
            current = current[part]
        wrong = "a string" if isinstance(current, (dict, list)) else {"not": ["a", current]}
        top = path[0]
        bad = rewrite(files[kind], tmp_path / f"{kind}.safetensors", meta={top: set_path(meta, path, wrong)[top]})
        with pytest.raises(UserError) as err:
            fileformat.read(bad, kind, profile=profiles.for_files())
        message = str(err.value)
        assert "\n" not in message and len(message) < len(str(bad)) + 300, message
        shown = ".".join(str(p) for p in path if not isinstance(p, int))
        assert "schema" in message and path[0] in message, (path, message)
        assert shown.split(".")[0] in message, (path, message)


# --- 3. hostile values anywhere: a UserError or a valid file, never anything else ------------------

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.just("x" * 100_000), st.just([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]),
    st.just(list(range(100_000))), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.lists(st.integers(min_value=-5, max_value=10**12), max_size=5),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), pick=st.integers(min_value=0), value=HOSTILE)
def test_hostile_values_anywhere_give_one_sentence(files, tmp_path, kind, pick, value):
    meta = meta_of(files[kind])
    paths = leaves(meta)
    path = paths[pick % len(paths)]
    bad = rewrite(files[kind], tmp_path / f"h-{kind}.safetensors", meta={path[0]: set_path(meta, path, value)[path[0]]})
    try:
        fileformat.read(bad, kind, profile=profiles.for_files())
    except UserError as err:
        assert "\n" not in str(err) and len(str(err)) < len(str(bad)) + 400, str(err)


# --- 4. fields that disagree with each other, tensors that disagree with the metadata -------------


def _data(meta: dict[str, Any], **change: Any) -> dict[str, Any]:
    return {**meta["data"], **change}


CROSS = [
    ("gradients", lambda m: {"data": _data(m, mean=[0.5, 0.5])}, None, "mean and std need one entry per channel"),
    ("gradients", lambda m: {"data": _data(m, batch_size=2)}, _factors_of_batch(2), "'labels' of shape '[1]'"),
    ("gradients", lambda m: {"data": _data(m, input_shape=[3, 16, 16])}, None, "differs from data.input_shape"),
    ("gradients", lambda m: {"loss": {**m["loss"], "includes_vb_kl": True}}, None, "includes_vb_kl"),
    ("gradients", lambda m: {"data": _data(m, class_names=["a", "b"])}, None, "class_names has 2 names"),
    ("gradients", lambda m: {"capture": {**m["capture"], "source": "untrained"}}, None, "untrained model has epoch 0"),
    ("gradients", None, {"labels": torch.tensor([10])}, "label 10 outside 0..9"),
    ("gradients", None, {"labels": torch.tensor([-1])}, "label -1 outside"),
    ("gradients", None, {"labels": None}, "lacks the tensor 'labels'"),
    ("gradients", None, {"grad.features.1.weight": torch.zeros(8, 192, dtype=torch.float64)}, "the format says F32"),
    ("gradients", lambda m: {"model": {**m["model"], "kwargs": {"width": 9}}}, None, "its metadata says"),
    ("gradients", lambda m: {"model": {**m["model"], "kwargs": {"norm": "batch"}}}, None, "mlp takes no option norm"),
    ("gradients", lambda m: {"model": {**m["model"], "name": "evil.module:build", "kwargs": {}}}, None,
     "add --model evil.module:build"),
    ("gradients", lambda m: {"defense": [{"name": "noise", "params": {"scale": 0.1, "distribution": "gaussian"}}] * 2},
     None, "listed twice"),
    ("gradients", lambda m: {"defense": [{"name": "prune", "params": {"keep": 0.5, "extra": 1}}]}, None, "extra"),
    ("truth", lambda m: {"indices": [0, 5]}, None, "do not span batch_size"),
    ("truth", lambda m: {"dump": {**m["dump"], "file": "../../etc/passwd"}}, None, "dump.file"),
    ("truth", lambda m: {"dump": {**m["dump"], "sha256": "ABC"}}, None, "dump.sha256"),
    ("truth", lambda m: {"dump": {**m["dump"], "file": "a\nError: forged.safetensors"}}, None, "dump.file"),
    ("gradients", lambda m: {"data": _data(m, class_names=["ok"] * 9 + ["two\nlines"])}, None, "class_names.9"),
    ("truth", None, {"indices": torch.tensor([7])}, "indices that are not 0..0"),
    ("truth", None, {"images": torch.full((1, 3, 8, 8), 2.0)}, "outside the pixel range"),
    ("reconstruction", lambda m: {"attack": {**m["attack"], "iterations_done": 99}}, None, "'loss_trace' of shape"),
    ("reconstruction", lambda m: {"source": {**m["source"], "file": "a/b.safetensors"}}, None, "source.file"),
    ("truth", lambda m: {"client_model": {"source": "untrained", "epoch": 3}}, None, "untrained model has epoch 0"),
    ("model", lambda m: {"train": {**m["train"], "epoch": 5}}, None, "beyond the run's 2 epochs"),
    ("model", None, {"extra.tensor": torch.zeros(1)}, "does not have"),
    ("training-state", lambda m: {"train": {**m["train"], "epoch": 1}}, None, "history has 2 epochs"),
    ("training-state", lambda m: {"train": {**m["train"], "device": "tpu"}}, None, "train.device"),
    ("training-state", None, {"rng.torch": torch.zeros(100, dtype=torch.uint8)}, "'rng.torch' of shape '[100]'"),
    ("attack-state", lambda m: {"step": 999}, None, "beyond the attack's 20 iterations"),
    ("attack-state", lambda m: {"sources": m["sources"] * 2}, None, "names a dump twice"),
    ("attack-state", lambda m: {"sources": []}, None, "sources"),
    ("attack-state", None, {"rng": torch.zeros(5055, dtype=torch.uint8)}, "'rng' of shape '[5055]'"),
]


@pytest.mark.parametrize(("kind", "meta", "tensors", "phrase"), CROSS, ids=[f"{c[0]}-{c[3][:30]}" for c in CROSS])
def test_fields_that_disagree_are_refused(files, tmp_path, kind, meta, tensors, phrase):
    original = meta_of(files[kind])
    bad = rewrite(files[kind], tmp_path / files[kind].name, meta=meta(original) if meta else None, tensors=tensors)
    with pytest.raises(UserError) as err:
        fileformat.read(bad, kind, profile=profiles.for_files())
    assert phrase in str(err.value) and "\n" not in str(err.value), str(err.value)


# --- 5. resource budgets before any work ----------------------------------------------------------


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_huge_model_is_refused_before_it_is_built(tmp_path):
    before = _peak_mib()
    result = invoke("capture-gradients", "--model", "mlp", "--width", 1_000_000, "--indices", "0:1",
                    "--out", tmp_path / "g")
    assert_one_line_error(result, "capturing with mlp (1,003,084,000,010 parameters)", "parameters", "--max-memory")
    result = invoke("capture-gradients", "--model", "mlp", "--image-size", 512, "--indices", "0:1",
                    "--out", tmp_path / "g")
    assert_one_line_error(result, "loading builtin at 512x512 pixels", "--image-size", "--max-memory")
    assert _peak_mib() - before < 300  # neither the 4-billion-parameter model nor 35 GiB of images was allocated
    assert not (tmp_path / "g").exists()
    result = invoke(*TRAIN[:1], "--model", "convnet", "--width", 100_000, "--out", tmp_path / "r")
    assert_one_line_error(result, "training convnet", "--max-memory", "lower --batch-size")


def test_a_dump_describing_a_huge_model_is_refused_by_its_tensor_table(files, tmp_path):
    meta = meta_of(files["gradients"])
    bad = rewrite(files["gradients"], tmp_path / "g" / DUMP0,
                  meta={"model": {**meta["model"], "kwargs": {"width": 1_000_000}}})
    before = _peak_mib()
    result = invoke("attack", bad, "--out", tmp_path / "r")
    # The first tensor whose declared shape the huge model contradicts: a factor (version 2) or the matrix.
    message = assert_one_line_error(result, str(bad), "its metadata says [")
    assert "1000000]" in message, message
    assert _peak_mib() - before < 300


def test_the_memory_limit_is_an_option(files, tmp_path):
    result = invoke("attack", files["grads"], "--iterations", 1, "--max-memory", 0.000001, "--out", tmp_path / "r")
    assert_one_line_error(result, "--max-memory", "over the limit")
    assert not (tmp_path / "r").exists()
    invoke_ok("attack", files["grads"], "--iterations", 1, "--max-memory", 1, "--out", tmp_path / "r")
    with pytest.raises(UserError, match="over the limit"):
        budget.set_max_memory(0.000001)
        try:
            fileformat.read(files["gradients"], "gradients")
        finally:
            budget.set_max_memory(None)


def test_a_group_over_the_limit_says_to_vectorize_less(files, tmp_path):
    model = profiles.profile(meta_of(files["gradients"])["model"], [])
    limit = (budget.attack_bytes(model, 1, 1, 1) + budget.attack_bytes(model, 1, 2, 1)) / 2 / budget.GIB
    result = invoke("attack", files["grads"], "--iterations", 1, "--max-memory", limit, "--out", tmp_path / "r")
    assert_one_line_error(result, "attacking 2 dump(s)", "lower --vectorize")
    invoke_ok("attack", files["grads"], "--iterations", 1, "--max-memory", limit, "--vectorize", 1,
              "--out", tmp_path / "r")


@pytest.mark.parametrize("args", [
    ["--iterations", 10**7], ["--restarts", 10**6], ["--vectorize", 10**6], ["--seed", -1], ["--seed", 2**64],
    ["--max-memory", 0],
])
def test_options_out_of_range_are_refused(files, tmp_path, args):
    result = invoke("attack", files["grads"], *args, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "r").exists()


def test_memory_grows_with_work_done_not_work_promised():
    from attacks.optimization import LossTrace

    trace = LossTrace(rows=8, limit=10**9, device=torch.device("cpu"))
    for step in range(3000):
        trace.record(step, torch.full((8,), float(step)))
    assert trace.upto(3000).shape == (8, 3000)
    assert trace._buffer.shape[1] <= 2 * 3000  # not 10**9 columns
    assert torch.equal(trace.upto(3000)[0], torch.arange(3000.0))


# --- 6. resumed state is validated like any other file --------------------------------------------


def _resume_attack(files: dict[str, Path], out: Path):
    return invoke(*ATTACK_STATE[:1], files["grads"] / DUMP0, *ATTACK_STATE[1:], "--out", out, "--resume")


@pytest.mark.parametrize(("change", "phrase"), [
    (lambda m, t: ({"step": 999}, {}), "beyond the attack's 20 iterations"),
    (lambda m, t: ({"step": 3}, {}), "optimiser took 7 steps, the checkpoint says 3"),
    (lambda m, t: ({"step": 3}, {"traces": t["traces"][:, :2]}), "loss trace of shape"),
    (lambda m, t: ({}, {"inputs": t["inputs"][:, :, :2]}), "inputs of shape"),
    (lambda m, t: ({}, {"adam.0.exp_avg": t["adam.0.exp_avg"][:, :, :1]}), "'adam.0.exp_avg' has shape"),
    (lambda m, t: ({}, {"adam.7.exp_avg": t["adam.0.exp_avg"]}), "'adam.7.exp_avg' is unexpected"),
    (lambda m, t: ({}, {"rng": t["rng"][:10]}), "'rng' of shape '[10]'"),
    (lambda m, t: ({}, {"rng": torch.zeros_like(t["rng"])}), "random generator state 'rng' that is not valid"),
    (lambda m, t: ({}, {"inputs": torch.zeros(0, 7, 1, 1, 1)}), "inputs of shape [0, 7,"),
    (lambda m, t: ({}, {"inputs": torch.zeros(0, 7, 1, 1, 1), "@shape": [0, 10**6, 10**6, 10**6, 10**6]}),
     "over 2^62 elements"),
    (lambda m, t: ({}, {"inputs": torch.zeros(0, 7, 1, 1, 1), "@shape": [0, 2**40, 1, 1, 1]}),
     "dimension over 2,147,483,647"),
    (lambda m, t: ({"sources": [{**m["sources"][0], "sha256": "0" * 64}]}, {}), "changed since"),
    (lambda m, t: ({"sources": [{**m["sources"][0], "file": "../" + DUMP0}]}, {}), "sources.0.file"),
])
def test_a_tampered_attack_state_is_refused_and_kept(files, tmp_path, change, phrase):
    out = tmp_path / "stopped"
    shutil.copytree(files["stopped"], out)
    state = out / "checkpoints" / DUMP0
    tensors, _ = load_raw(state)
    meta, new_tensors = change(meta_of(state), tensors)
    shape = new_tensors.pop("@shape", None)
    rewrite(state, state, meta=meta, tensors=new_tensors)
    if shape is not None:  # a shape no tensor can have in memory, written into the header alone
        blob = state.read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        header["inputs"]["shape"] = shape
        text = json.dumps(header).encode()
        state.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n :])
    before = tree_digest(out)
    result = _resume_attack(files, out)
    assert_one_line_error(result, phrase)
    assert tree_digest(out) == before  # the run's own checkpoint is neither replaced nor removed


def test_an_untampered_attack_state_resumes(files, tmp_path):
    out = tmp_path / "stopped"
    shutil.copytree(files["stopped"], out)
    result = _resume_attack(files, out)
    assert result.exit_code == 0, result.output
    assert fileformat.read(out / DUMP0, "reconstruction").meta["attack"]["iterations_done"] == 20


@pytest.mark.parametrize(("change", "phrase"), [
    (lambda m, t: ({"train": {**m["train"], "epoch": 9}}, {}), "history has 2 epochs but epoch says 9"),
    (lambda m, t: ({"train": {**m["train"], "history": m["train"]["history"][::-1]}}, {}), "not 1, 2"),
    (lambda m, t: ({}, {"optimizer.0.exp_avg": torch.zeros(3)}), "'optimizer.0.exp_avg' of shape [3]"),
    (lambda m, t: ({}, {"optimizer.0.momentum_buffer": torch.zeros(8, 192)}), "that adam on this model does not have"),
    (lambda m, t: ({}, {"optimizer.99.exp_avg": torch.zeros(3)}), "'optimizer.99.exp_avg'"),
    (lambda m, t: ({}, {"optimizer.0.step": torch.tensor(-5.0)}), "step count out of range"),
    (lambda m, t: ({}, {"rng.noise": torch.zeros(7, dtype=torch.uint8)}), "noise generator state of 7 bytes"),
    (lambda m, t: ({}, {"rng.shuffle": None}), "lacks the tensor 'rng.shuffle'"),
    (lambda m, t: ({}, {"rng.torch": torch.zeros_like(t["rng.torch"])}), "state 'rng.torch' that is not valid"),
    (lambda m, t: ({}, {"optimizer.0.exp_avg": None}), "lacks optimiser state 'optimizer.0.exp_avg'"),
    (lambda m, t: ({}, {k: None for k in t if k.startswith("optimizer.")}), "holds no optimiser state after 2"),
])
def test_a_tampered_training_state_is_refused_and_kept(files, tmp_path, change, phrase):
    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    state = run / "checkpoints" / "resume.safetensors"
    tensors, _ = load_raw(state)
    meta, new_tensors = change(meta_of(state), tensors)
    rewrite(state, state, meta=meta, tensors=new_tensors)
    before = tree_digest(run)
    result = invoke(*[a if a != 2 else 3 for a in TRAIN], "--resume", "--out", run)
    assert_one_line_error(result, phrase)
    assert tree_digest(run) == before


# --- 7. what evaluate reads; the model the client used --------------------------------------------


def test_capture_records_the_checkpoints_own_accuracy_and_an_absolute_run(files):
    capture = meta_of(files["gradients"])["capture"]
    checkpoint = meta_of(files["run"] / "checkpoints" / "epoch-0001.safetensors")["train"]
    final = meta_of(files["model"])["train"]
    assert capture["epoch"] == 1 and capture["test_accuracy"] == checkpoint["test_accuracy"]
    assert final["epoch"] == 2
    assert Path(capture["run"]).is_absolute() and Path(capture["run"]) == files["run"].resolve()
    truth = meta_of(files["truth"])
    assert truth["client_model"] == {"source": "run", "epoch": 1, "test_accuracy": checkpoint["test_accuracy"]}


def test_evaluate_opens_only_reconstructions_and_truth_files(files, tmp_path):
    grads, recon = tmp_path / "grads", tmp_path / "recon"
    grads.mkdir()
    for truth in files["grads"].glob("*.truth.safetensors"):
        shutil.copy2(truth, grads / truth.name)  # no dumps beside the truth files, and no run folder
    shutil.copytree(files["recon"], recon)
    invoke_ok("evaluate", recon, "--truth", grads, "--out", tmp_path / "report")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    details = metrics["groups"][0] if "groups" in metrics else metrics
    text = json.dumps(details)
    accuracy = meta_of(files["truth"])["client_model"]["test_accuracy"]
    assert "epoch 1" in text and str(accuracy)[:6] in text, text[:2000]


def test_evaluate_refuses_a_truth_file_of_other_victims_and_two_reconstructions_of_one_dump(files, tmp_path):
    grads, recon = tmp_path / "grads", tmp_path / "recon"
    shutil.copytree(files["grads"], grads)
    shutil.copytree(files["recon"], recon)
    truth = meta_of(files["truth"])
    rewrite(files["truth"], grads / TRUTH0, meta={"data": {**truth["data"], "num_classes": 100,
                                                           "class_names": []}})
    result = invoke("evaluate", recon, "--truth", grads, "--out", tmp_path / "report")
    assert_one_line_error(result, "disagree on data.num_classes")
    shutil.copy2(files["truth"], grads / TRUTH0)
    shutil.copy2(recon / DUMP0, recon / "copy.safetensors")
    result = invoke("evaluate", recon, "--truth", grads, "--out", tmp_path / "report")
    assert_one_line_error(result, "reconstruct the same dump")
    assert not (tmp_path / "report").exists()


def test_a_checkpoint_whose_epoch_disagrees_with_its_name_is_refused(files, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    checkpoint = run / "checkpoints" / "epoch-0001.safetensors"
    rewrite(checkpoint, checkpoint, meta={"train": {**meta_of(checkpoint)["train"], "epoch": 2}})
    result = invoke("capture-gradients", run, "--epoch", 1, "--indices", "0:1", "--out", tmp_path / "g")
    assert_one_line_error(result, "after epoch 2, not 1")
    assert not (tmp_path / "g").exists()


def test_resume_never_reads_a_reconstruction_through_a_planted_symlink(files, tmp_path):
    out = tmp_path / "stopped"
    shutil.copytree(files["stopped"], out)
    outside = tmp_path / "outside.safetensors"
    shutil.copy2(files["reconstruction"], outside)
    (out / DUMP0).unlink(missing_ok=True)
    (out / DUMP0).symlink_to(outside)
    before = tree_digest(tmp_path)
    result = _resume_attack(files, out)
    assert_one_line_error(result, "symbolic link that precode did not create")
    assert tree_digest(tmp_path) == before
