"""precode in Flower, offline: the recorder, the ClientApp helper and the mods fed constructed Messages.

No Flower server, no simulation: strategies and ClientApps are called directly, on a tiny MLP over a
20-image `tensors` dataset, so the whole file takes seconds. The Flower simulation itself runs in
examples/flower/run.sh.
"""

from __future__ import annotations

import os

for _name, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                      ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
    os.environ[_name] = _value

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from defenses.noise import draw  # noqa: E402
from precode_cli import fileformat  # noqa: E402
from precode_cli.errors import UserError  # noqa: E402
from precode_cli.flower import ConfigKeys, RecordingStrategy, Setup, defense_mod, train_locally, truth_mod  # noqa: E402
from precode_cli.stages import profiles  # noqa: E402
from precode_cli.stages.capture import batch_seed  # noqa: E402
from helpers import invoke_ok  # noqa: E402

LR = 0.1


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 20-image dataset, the setups of a tiny MLP with and without PRECODE, and two captures of victims 0..1:
    a gradient dump (seed 0) and a one-step update with --defense noise (seed 3)."""
    root = tmp_path_factory.mktemp("flower")
    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"images": images, "labels": torch.arange(20) % 10}, str(root / "set.safetensors"))
    common = ["--dataset", "tensors", "--data-dir", root / "set.safetensors", "--model", "mlp", "--width", "16",
              "--indices", "0:2", "--batch-size", "2"]
    invoke_ok("capture-gradients", *common, "--seed", "0", "--out", root / "grads")
    invoke_ok("capture-gradients", *common, "--seed", "3", "--defense", "noise", "--noise-scale", "0.01",
              "--local-steps", "1", "--local-lr", str(LR), "--out", root / "noisy")
    data = {"dataset": "tensors", "data_dir": root / "set.safetensors", "width": 16}
    return {"root": root, "setup": Setup.create("mlp", **data), "precode": Setup.create("mlp", "precode", **data),
            "dump": root / "grads" / "train-000000.safetensors", "noisy": root / "noisy" / "train-000000.safetensors",
            "truth": fileformat.read(root / "grads" / "train-000000.truth.safetensors", "truth")}


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages made outside a Flower run need the identity a SuperLink would set."""
    for attribute in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


class Nodes:
    """The part of a Grid that FedAvg's configure_train uses."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def tensors_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


def client_app(setup: Setup, examples, mods: list | None = None) -> ClientApp:
    """A ClientApp that trains with precode's helper on examples(context)."""
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        images, labels = examples(context)[:2]
        arrays, metrics = train_locally(msg, setup, images, labels, generator=torch.Generator().manual_seed(0))
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def train_message(arrays: dict[str, torch.Tensor], node: int = 7, **config: object) -> Message:
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"lr": LR, "server-round": 1,
                                                                                 **config})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def context(node: int = 7) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def test_recorder_writes_valid_updates_and_leaves_the_aggregate_bit_identical(world: dict, tmp_path: Path) -> None:
    setup = world["setup"]
    model, _ = setup.build()
    initial = ArrayRecord(model.state_dict())
    dataset = fileformat.read(world["dump"], "gradients").meta["data"]
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    examples = lambda ctx: (images[2 * (ctx.node_id - 1):2 * ctx.node_id], labels[2 * (ctx.node_id - 1):2 * ctx.node_id])
    app = client_app(setup, examples, [truth_mod(tmp_path / "truth", examples, setup, enabled=True)])
    recorder = RecordingStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4),
                                 tmp_path / "updates", setup)
    config = ConfigRecord({"lr": LR, "local-steps": 2, "batch-size": 1})
    messages = list(recorder.configure_train(1, initial, config, Nodes([1, 2, 3, 4])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3, 4]
    replies = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node == 4:  # a client that failed: neither recorded nor aggregated
            replies.append(Message(Error(0, "out of memory"), reply_to=message))
        else:
            replies.append(app(message, context(node)))
    before = [{k: a.numpy().tobytes() for k, a in r.content["arrays"].items()} for r in replies if not r.has_error()]

    arrays, metrics = recorder.aggregate_train(1, iter(replies))
    expected_arrays, expected_metrics = FedAvg(fraction_evaluate=0.0).aggregate_train(1, replies)
    assert list(arrays.keys()) == list(expected_arrays.keys())
    for name in arrays.keys():
        got, want = arrays[name].numpy(), expected_arrays[name].numpy()
        assert got.dtype == want.dtype and np.array_equal(got, want), name  # bit for bit: same inputs, same order
    assert dict(metrics) == dict(expected_metrics)
    after = [{k: a.numpy().tobytes() for k, a in r.content["arrays"].items()} for r in replies if not r.has_error()]
    assert after == before  # the replies went through untouched

    written = sorted(p.name for p in (tmp_path / "updates").glob("*.safetensors"))
    assert written == [f"round-001-node-{n}.safetensors" for n in (1, 2, 3)]
    sent = tensors_of(initial)
    for reply in [r for r in replies if not r.has_error()]:
        node = reply.metadata.src_node_id
        stored = fileformat.read(tmp_path / "updates" / f"round-001-node-{node}.safetensors", "update",
                                 profile=profiles.for_files())
        assert all(torch.equal(stored.prefixed("param")[n], sent[n]) for n in sent)
        returned = stored.prefixed("returned")
        assert all(torch.equal(returned[n], tensors_of(reply.content["arrays"])[n]) for n in returned)
        local = stored.meta["local"]
        assert (local["lr"], local["steps"], local["batch_size"], local["num_examples"]) == (LR, 2, 1, 2)
        assert set(local["known"]) == {"lr", "steps", "batch_size", "num_examples"}  # momentum etc. are assumed
        capture = stored.meta["capture"]
        assert (capture["source"], capture["round"], capture["node"], capture["labels_shared"]) == \
            ("flower", 1, str(node), False)
        assert "labels" not in stored.tensors
        assert stored.meta["data"] == {**dataset, "batch_size": 2}
        truth = fileformat.read(tmp_path / "truth" / f"round-001-node-{node}.truth.safetensors", "truth")
        assert truth.meta["dump"]["content_sha256"] == fileformat.update_digest(returned)
        assert torch.equal(truth.tensors["images"], examples(context(node))[0])


def test_recorder_records_only_the_chosen_rounds_and_nodes(world: dict, tmp_path: Path) -> None:
    setup = world["setup"]
    model, _ = setup.build()
    initial = ArrayRecord(model.state_dict())
    images, labels = world["truth"].tensors["images"], world["truth"].tensors["labels"]
    app = client_app(setup, lambda ctx: (images, labels))
    recorder = RecordingStrategy(FedAvg(fraction_evaluate=0.0), tmp_path / "updates", setup, rounds=[1], nodes=[2])
    for server_round in (1, 2):
        messages = recorder.configure_train(server_round, initial, ConfigRecord({"lr": LR}), Nodes([1, 2]))
        replies = [app(m, context(m.metadata.dst_node_id)) for m in messages]
        recorder.aggregate_train(server_round, replies)
    assert [p.name for p in (tmp_path / "updates").glob("*.safetensors")] == ["round-001-node-2.safetensors"]
    recorder.close()


def test_one_step_update_from_the_client_app_equals_capture_gradients_dump(world: dict, tmp_path: Path) -> None:
    """Same weights, same batch: returned == param - lr * grad, bit for bit (the same float32 arithmetic:
    capture's gradient and sgd_step's weight - lr * g), through a ClientApp with a mod in its chain."""
    dump = fileformat.read(world["dump"], "gradients", profile=profiles.for_files())
    truth = world["truth"]
    examples = lambda ctx: (truth.tensors["images"], truth.tensors["labels"])
    app = client_app(world["setup"], examples, [truth_mod(tmp_path / "truth", examples, world["setup"], enabled=True)])
    params = dump.prefixed("param")
    reply = app(train_message(params), context())
    assert not reply.has_error()
    returned = tensors_of(reply.content["arrays"])
    assert list(returned) == list(params)
    for name, grad in dump.prefixed("grad").items():
        assert torch.equal(returned[name], params[name] - LR * grad), name
    assert dict(reply.content["metrics"]) == {"num-examples": 2}


def test_truth_mod_writes_nothing_unless_enabled(world: dict, tmp_path: Path) -> None:
    truth = world["truth"]
    examples = lambda ctx: (truth.tensors["images"], truth.tensors["labels"])
    app = client_app(world["setup"], examples, [truth_mod(tmp_path / "truth", examples, world["setup"])])
    reply = app(train_message(fileformat.read(world["dump"], "gradients").prefixed("param")), context())
    assert not reply.has_error()
    assert not (tmp_path / "truth").exists()


def test_noise_mod_on_one_step_equals_capture_with_the_noise_defense(world: dict) -> None:
    """The mod shares global - lr * (g + noise); with capture's generator, that is capture's one-step update
    with --defense noise, to float rounding (the mod recovers g from the update in float64)."""
    noisy = fileformat.read(world["noisy"], "update", profile=profiles.for_files())
    truth = fileformat.read(world["noisy"].with_name("train-000000.truth.safetensors"), "truth")
    seed = batch_seed(3, 0)  # capture draws each batch's noise from --seed 3 and the batch's first index, 0
    mod = defense_mod("noise", setup=world["setup"], noise_scale=0.01,
                      generator=lambda msg, ctx: torch.Generator().manual_seed(seed))
    plain_app = client_app(world["setup"], lambda ctx: (truth.tensors["images"], truth.tensors["labels"]))
    app = client_app(world["setup"], lambda ctx: (truth.tensors["images"], truth.tensors["labels"]), [mod])
    params = noisy.prefixed("param")
    plain = tensors_of(plain_app(train_message(params), context()).content["arrays"])
    shared = tensors_of(app(train_message(params), context()).content["arrays"])
    generator = torch.Generator().manual_seed(seed)
    returned_by_name = noisy.prefixed("returned")
    for name in world["setup"].trainable_names():  # noise is drawn tensor by tensor in model order, as capture draws it
        returned = returned_by_name[name]
        noise = draw(params[name].shape, "gaussian", 0.01, generator)
        documented = params[name].double() - LR * ((params[name].double() - plain[name].double()) / LR + noise)
        assert torch.equal(shared[name], documented.float()), name
        assert torch.allclose(shared[name], returned, rtol=0, atol=1e-6), name
        assert not torch.equal(shared[name], plain[name])


def test_prune_and_ppp_mods_perturb_what_they_document(world: dict) -> None:
    truth = world["truth"]
    examples = lambda ctx: (truth.tensors["images"], truth.tensors["labels"])
    for setup, mod, check in (
        (world["setup"], defense_mod("prune", setup=world["setup"], prune_keep=0.25), "prune"),
        (world["precode"], defense_mod("ppp", setup=world["precode"], ppp_clip=1e-3, ppp_sigma=0.0), "ppp"),
    ):
        model, _ = setup.build()
        params = {n: p.detach().clone() for n, p in model.state_dict().items()}
        torch.manual_seed(0)
        plain = tensors_of(client_app(setup, examples)(train_message(params), context()).content["arrays"])
        torch.manual_seed(0)  # PRECODE's sample: the same draw in both runs
        shared = tensors_of(client_app(setup, examples, [mod])(train_message(params), context()).content["arrays"])
        if check == "prune":
            for name in params:
                kept = (params[name] != shared[name]).sum().item()
                assert kept <= -(-params[name].numel() // 4), name
        else:
            before = [n for n in params if not n.startswith(("classifier.layer", "classifier.bottleneck.decoder"))]
            assert all(torch.equal(shared[n], plain[n]) for n in params if n not in before)  # after the sample
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm((params[n] - shared[n]).double() / LR)
                                                         for n in before]))
            assert norm.item() == pytest.approx(1e-3, rel=1e-5)


def test_defense_mod_answers_a_train_message_without_learning_rate_with_an_error(world: dict) -> None:
    app = client_app(world["setup"], lambda ctx: (world["truth"].tensors["images"], world["truth"].tensors["labels"]),
                     [defense_mod("noise", keys=ConfigKeys(lr="learning-rate"))])
    reply = app(train_message(fileformat.read(world["dump"], "gradients").prefixed("param")), context())
    assert reply.has_error() and "learning rate" in reply.error.reason
    with pytest.raises(UserError, match="each example"):
        defense_mod("dp")


def test_without_flower_the_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "precode_cli.flower" or n.startswith("precode_cli.flower.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr now raises ImportError
    with pytest.raises(UserError, match=r'install "precode\[flower\]"'):
        import precode_cli.flower  # noqa: F401


def test_recipe_marks_what_the_server_sent_as_known_and_the_rest_as_assumed() -> None:
    from precode_cli.flower.records import recipe_from_config

    recipe = recipe_from_config({"lr": 0.05, "local-epochs": 2, "batch-size": 2}, 5, assume={"momentum": 0.9})
    assert (recipe.steps, recipe.epochs, recipe.batch_size, recipe.num_examples, recipe.momentum) == (6, 2, 2, 5, 0.9)
    assert set(recipe.known) == {"lr", "epochs", "batch_size", "num_examples", "steps"}
    short = recipe_from_config({"lr": 0.05, "local-steps": 2, "batch-size": 1}, 8)  # trains on its first 2 only
    assert (short.num_examples, short.steps, "momentum" in short.known) == (2, 2, False)
    with pytest.raises(UserError, match="learning rate"):
        recipe_from_config({}, 4)
