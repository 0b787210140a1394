"""Model builders: every built-in architecture with and without PRECODE, PRECODE's position, clear
refusals, users' own builders (imported only when named), and BatchNorm state in gradient dumps."""

from __future__ import annotations

import math
import sys
import uuid

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses
from defenses.precode import VariationalBottleneck, insert_vb, vb_loss
from helpers import DUMP0, assert_one_line_error, invoke, invoke_ok
from precode_cli import data, fileformat, models
from precode_cli.errors import UserError
from precode_cli.stages import profiles

# (name, options): small widths keep the suite fast; resnet18 takes no width.
BUILTINS = [
    ("mlp", {"width": 8}),
    ("cnn", {"width": 4}),
    ("lenet", {}),
    ("convnet", {"width": 2}),
    ("resnet18", {"norm": "batch"}),
    ("resnet18", {"norm": "group"}),
]
# (input shape, classes): the two usual sizes, and a larger size for every model but the slow resnet18
# (whose stem at that size test_resnet18_stem_follows_the_image_size checks, forward pass included).
SHAPES = [((1, 28, 28), 10), ((3, 32, 32), 3)]
LARGE = ((1, 96, 96), 3)
MODEL_CASES = [(case, shape) for case in BUILTINS for shape in SHAPES + ([LARGE] if case[0] != "resnet18" else [])]


def _ids(case):
    name, options = case
    return name + "".join(f"-{k}{v}" for k, v in options.items())


def test_every_builtin_model_is_covered():
    assert sorted({name for name, _ in BUILTINS}) == sorted(models.BUILDERS)


@pytest.mark.parametrize("defense", ["none", "precode"])
@pytest.mark.parametrize("case,shape_classes", MODEL_CASES,
                         ids=[f"{_ids(case)}-{'x'.join(map(str, shape))}-{classes}" for case, (shape, classes) in MODEL_CASES])
def test_builtin_model_forward_and_backward(case, shape_classes, defense):
    (name, options), (shape, classes) = case, shape_classes
    torch.manual_seed(0)
    spec = models.make_spec(name, shape, classes, **options)
    assert spec == {"name": name, "kwargs": options, "input_shape": list(shape), "num_classes": classes}
    stack = defenses.stack_from_cli(defense, **({"precode_k": 8} if defense == "precode" else {}))
    model = stack.build_model(spec)
    has_vb = any(isinstance(m, VariationalBottleneck) for m in model.modules())
    assert has_vb == (defense == "precode")
    model.train()
    x = torch.randn(2, *shape)
    y = torch.tensor([0, classes - 1])
    logits = model(x)
    assert logits.shape == (2, classes)
    assert torch.isfinite(logits).all()
    loss = stack.loss(model, logits, y)
    if defense == "precode":  # the client's loss is cross-entropy plus beta * KL
        assert loss > F.cross_entropy(logits, y)
    loss.backward()
    named = list(model.named_parameters())
    assert named
    for pname, parameter in named:
        assert parameter.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for _, p in named)
    # The output layer always gets a non-zero gradient.
    assert sum(p.grad.abs().sum() for n, p in named if n.startswith(("classifier", "fc"))) > 0


def test_resnet18_stem_follows_the_image_size():
    small = models.build(models.make_spec("resnet18", (1, 28, 28), 10))
    large = models.build(models.make_spec("resnet18", (1, 96, 96), 10, norm="group"))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert small.conv1.in_channels == 1
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2) and isinstance(large.maxpool, nn.MaxPool2d)
    logits = large(torch.randn(1, 1, 96, 96))
    assert logits.shape == (1, 10)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in large.parameters())
    group = models.build(models.make_spec("resnet18", (3, 32, 32), 10, norm="group"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in group.modules()) == 20
    assert not list(group.buffers())  # no running statistics


def test_width_sets_the_layer_sizes():
    mlp = models.build(models.make_spec("mlp", (1, 28, 28), 10, width=8))
    assert mlp.features[1].weight.shape == (8, 784) and mlp.classifier.weight.shape == (10, 8)
    cnn = models.build(models.make_spec("cnn", (3, 32, 32), 10, width=4))
    assert cnn.features[0].out_channels == 4 and cnn.features[3].out_channels == 8
    convnet = models.build(models.make_spec("convnet", (3, 32, 32), 10, width=2))
    assert [m.out_channels for m in convnet.modules() if isinstance(m, nn.Conv2d)] == [2, 4, 4, 8, 8, 8, 8, 8]
    assert convnet.classifier.in_features == 36 * 2  # Inverting Gradients' 36w for 32-pixel images
    lenet = models.build(models.make_spec("lenet", (1, 28, 28), 10))
    assert lenet.classifier.in_features == 12 * 7 * 7
    assert all(p.abs().max() <= 0.5 for p in lenet.parameters())  # DLG's uniform initialisation


# --- PRECODE's position ---------------------------------------------------------------------------------

POSITIONS = [
    # (model, options, input shape, at, parameter prefix, shape the VB sees, a parameter of the wrapped layer)
    ("mlp", {"width": 8}, (3, 32, 32), None, "classifier", (8,), "classifier.layer.weight"),
    ("mlp", {"width": 8}, (3, 32, 32), "features.3", "features.3", (8,), "features.3.layer.weight"),
    ("resnet18", {}, (3, 32, 32), None, "fc", (512,), "fc.layer.weight"),
    ("resnet18", {}, (3, 32, 32), "layer4", "layer4", (256, 8, 8), "layer4.layer.0.conv1.weight"),
]


@pytest.mark.parametrize("name,options,shape,at,prefix,seen,wrapped", POSITIONS,
                         ids=["mlp-default", "mlp-features.3", "resnet18-default", "resnet18-layer4"])
def test_precode_position(name, options, shape, at, prefix, seen, wrapped):
    torch.manual_seed(0)
    spec = models.make_spec(name, shape, 10, **options)
    plain = models.build(spec)
    torch.manual_seed(0)
    original = models.build(spec)
    model = insert_vb(original, shape, at=at, k=8, beta=1e-3)
    names = [n for n, _ in model.named_parameters()]
    vb_names = [n for n in names if ".bottleneck." in n]
    assert sorted(vb_names) == sorted(f"{prefix}.bottleneck.{part}.{kind}"
                                      for part in ("encoder", "decoder") for kind in ("weight", "bias"))
    assert wrapped in names
    # Every parameter of the undefended model is still there, under <at>.layer.* when it was wrapped, same values.
    plain_params = dict(plain.named_parameters())
    renamed = {n.replace(f"{prefix}.layer.", f"{prefix}.", 1) if n.startswith(f"{prefix}.layer.") else n: p
               for n, p in model.named_parameters() if ".bottleneck." not in n}
    assert renamed.keys() == plain_params.keys()
    assert all(torch.equal(renamed[n], plain_params[n]) for n in plain_params)
    vbs = [m for m in model.modules() if isinstance(m, VariationalBottleneck)]
    assert len(vbs) == 1 and vbs[0].feature_shape == seen and vbs[0].k == 8
    assert vbs[0].encoder.in_features == math.prod(seen) and vbs[0].decoder.out_features == math.prod(seen)
    x = torch.randn(2, *shape)
    model.train()
    first, second = model(x), model(x)
    assert first.shape == second.shape == plain.train()(x).shape == (2, 10)
    assert not torch.allclose(first, second)  # a fresh sample on every forward pass
    term = vb_loss(model)
    assert torch.isfinite(term) and term > 0
    assert torch.allclose(term, 1e-3 * vbs[0].last_kl)


def test_defense_stack_records_the_resolved_position():
    stack = defenses.stack_from_cli("precode", precode_k=8, precode_beta=1e-3)
    stack.build_model(models.make_spec("mlp", (1, 28, 28), 10, width=8))
    assert stack.specs() == [{"name": "precode", "params": {"k": 8, "beta": 1e-3, "at": "classifier"}}]


@pytest.mark.parametrize("at,expected_at", [(None, "classifier"), ("features.3", "features.3")])
def test_precode_at_through_train_and_capture(tmp_path, at, expected_at):
    run, grads = tmp_path / "run", tmp_path / "grads"
    extra = ["--precode-at", at] if at else []
    invoke_ok("train", "--model", "mlp", "--width", 8, "--defense", "precode", "--precode-k", 8, *extra,
              "--epochs", 0, "--out", run)
    stored = fileformat.read(run / "model.safetensors", "model")
    assert stored.meta["defense"] == [{"name": "precode", "params": {"k": 8, "beta": 1e-3, "at": expected_at}}]
    assert f"{expected_at}.bottleneck.encoder.weight" in stored.tensors
    invoke_ok("capture-gradients", run, "--indices", "0:1", "--out", grads)
    dump = fileformat.read(grads / DUMP0, "gradients")
    grad_names = {n[len("grad."):] for n in dump.tensors if n.startswith("grad.")}
    assert {f"{expected_at}.bottleneck.encoder.weight", f"{expected_at}.bottleneck.decoder.bias",
            f"{expected_at}.layer.weight"} <= grad_names
    assert f"{expected_at}.weight" not in grad_names
    assert dump.meta["defense"] == stored.meta["defense"]


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,phrases", [
    (["--model", "vgg11"], ["unknown --model 'vgg11'", "resnet18"]),
    (["--model", "lenet", "--width", 8], ["--model lenet does not take --width", "no options"]),
    (["--model", "resnet18", "--width", 8], ["--model resnet18 does not take --width", "--norm"]),
    (["--model", "mlp", "--norm", "batch"], ["--model mlp does not take --norm", "--width"]),
    (["--model", "resnet18", "--norm", "layer"], ["unknown --norm 'layer'", "choose one of: batch, group"]),
    (["--model", "mlp", "--width", 8, "--defense", "precode", "--precode-at", "features.9"],
     ["no submodule named 'features.9'", "features.3", "classifier"]),
    (["--model", "resnet18", "--defense", "precode", "--precode-at", "layer1.0.relu"],
     ["'layer1.0.relu' is called 2 times"]),
], ids=["unknown-model", "width-lenet", "width-resnet18", "norm-mlp", "bad-norm", "no-such-module", "called-twice"])
def test_train_refuses_bad_model_options(tmp_path, args, phrases):
    out = tmp_path / "run"
    result = invoke("train", *args, "--epochs", 0, "--out", out)
    assert_one_line_error(result, *phrases)
    assert not (out / "model.safetensors").exists()


def test_python_api_refusals():
    with pytest.raises(UserError, match="unknown --model"):
        models.make_spec("alexnet", (3, 32, 32), 10)
    with pytest.raises(UserError, match="positive whole number"):
        models.make_spec("mlp", (3, 32, 32), 10, width=0)
    with pytest.raises(UserError, match="unknown model 'alexnet' in the file"):
        models.build({"name": "alexnet", "kwargs": {}, "input_shape": [3, 32, 32], "num_classes": 10})
    with pytest.raises(UserError, match="does not take --norm"):
        models.build({"name": "mlp", "kwargs": {"norm": "batch"}, "input_shape": [3, 32, 32], "num_classes": 10})
    model = models.build(models.make_spec("mlp", (1, 28, 28), 10, width=8))
    with pytest.raises(UserError, match="its submodules are: features, features.0"):
        insert_vb(model, (1, 28, 28), at="head")
    assert not any(isinstance(m, VariationalBottleneck) for m in model.modules())  # left untouched
    with pytest.raises(UserError, match="no nn.Linear"):
        insert_vb(nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 8, 8))


# --- a user's own model ---------------------------------------------------------------------------------

USER_MODEL = '''
from pathlib import Path
from torch import nn

Path("IMPORTED-{tag}").write_text("imported")  # a side effect that shows each import


def build(input_shape, num_classes):
    channels, height, width = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, 8), nn.ReLU(), nn.Linear(8, num_classes))


def build_with_kwargs(**kwargs):
    return build(kwargs["input_shape"], kwargs["num_classes"])


def not_a_model(input_shape, num_classes):
    return [input_shape, num_classes]


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module file in a fresh working directory; its name is unique, so no test sees another's import."""
    tag = uuid.uuid4().hex[:10]
    name = f"precode_user_model_{tag}"
    (tmp_path / f"{name}.py").write_text(USER_MODEL.format(tag=tag))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo precode's sys.path insertion afterwards
    yield name, tmp_path / f"IMPORTED-{tag}"
    sys.modules.pop(name, None)


def test_user_model_train_capture_attack(user_module, tmp_path):
    name, marker = user_module
    builder = f"{name}:build"
    run, grads, recon = tmp_path / "run", tmp_path / "grads", tmp_path / "recon"
    invoke_ok("train", "--model", builder, "--epochs", 1, "--subset", 64, "--batch-size", 32, "--out", run)
    assert marker.exists()
    # Checking a file of user code by its model's shapes needs the same permission.
    with pytest.raises(UserError, match="add --model"):
        fileformat.read(run / "model.safetensors", "model", profile=profiles.for_files())
    stored = fileformat.read(run / "model.safetensors", "model", profile=profiles.for_files(builder))
    assert stored.meta["model"] == {"name": builder, "kwargs": {}, "input_shape": [3, 32, 32], "num_classes": 10}
    assert sorted(stored.tensors) == ["1.bias", "1.weight", "3.bias", "3.weight"]

    # A run of user code is rebuilt only when the user names the code again.
    result = invoke("capture-gradients", run, "--indices", "0:1", "--out", tmp_path / "refused")
    assert_one_line_error(result, f"add --model {builder}")
    invoke_ok("capture-gradients", run, "--model", builder, "--indices", "0:1", "--out", grads)
    dump = fileformat.read(grads / DUMP0, "gradients")
    assert dump.meta["model"]["name"] == builder
    assert all(torch.equal(dump.tensors[f"param.{n}"], t) for n, t in stored.tensors.items())

    # The attack must not import the code the dump names unless the user names it too.
    sys.modules.pop(name, None)
    marker.unlink()
    result = invoke("attack", grads, "--iterations", 1, "--out", recon)
    assert_one_line_error(result, builder, f"add --model {builder}")
    assert not marker.exists(), "the dump made precode import code on its own"
    assert not recon.exists()
    result = invoke("attack", grads, "--trust-builder", f"{name}:build_with_kwargs", "--iterations", 1, "--out", recon)
    assert_one_line_error(result, "add --model")  # another builder than the dump's is no permission either
    assert not marker.exists()

    invoke_ok("attack", grads, "--trust-builder", builder, "--iterations", 1, "--out", recon)
    assert marker.exists()
    reconstruction = fileformat.read(recon / DUMP0, "reconstruction")
    assert reconstruction.tensors["images"].shape == (1, 3, 32, 32)


def test_user_builder_taking_kwargs(user_module):
    name, _ = user_module
    spec = models.make_spec(f"{name}:build_with_kwargs", (1, 28, 28), 3)
    model = models.build(spec, trusted_builder=f"{name}:build_with_kwargs")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(UserError, match="add --model"):
        models.build(spec)


@pytest.mark.parametrize("attribute,phrases", [
    ("not_a_model", ["returned list, not a torch nn.Module"]),
    ("NOT_CALLABLE", ["'NOT_CALLABLE' is not callable"]),
    ("missing", ["cannot import 'missing'"]),
])
def test_user_builder_refusals(user_module, tmp_path, attribute, phrases):
    name, _ = user_module
    result = invoke("capture-gradients", "--model", f"{name}:{attribute}", "--indices", "0:1", "--out", tmp_path / "g")
    assert_one_line_error(result, f"--model {name}:{attribute}", *phrases)
    assert not (tmp_path / "g").exists()


def test_user_module_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"no_such_module_{uuid.uuid4().hex[:10]}"
    result = invoke("train", "--model", f"{name}:build", "--epochs", 0, "--out", tmp_path / "run")
    assert_one_line_error(result, f"cannot import 'build' from '{name}'")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_user_model_takes_no_builtin_options(user_module, tmp_path):
    name, _ = user_module
    result = invoke("train", "--model", f"{name}:build", "--width", 8, "--epochs", 0, "--out", tmp_path / "run")
    assert_one_line_error(result, "--width", "built-in models only")


def test_user_module_with_a_syntax_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"broken_user_model_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text("def build(input_shape, num_classes:\n    pass\n")
    try:
        result = invoke("train", "--model", f"{name}:build", "--epochs", 0, "--out", tmp_path / "run")
    finally:
        sys.modules.pop(name, None)
    assert_one_line_error(result, f"--model {name}:build")


# --- BatchNorm state in gradient dumps ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bn_dumps(tmp_path_factory):
    """Two dumps (batches of 2) of an untrained convnet, captured in train mode and in eval mode."""
    root = tmp_path_factory.mktemp("bn")
    for mode in ("train", "eval"):
        invoke_ok("capture-gradients", "--model", "convnet", "--width", 2, "--indices", "0:4", "--batch-size", 2,
                  "--mode", mode, "--seed", 3, "--out", root / mode)
    return root


def _recompute_grads(dump: fileformat.StoredFile, truth: fileformat.StoredFile, train_mode: bool):
    model = models.build(dump.meta["model"])
    model.load_state_dict({**dump.prefixed("param"), **dump.prefixed("buffer")}, strict=True)
    model.train(train_mode)
    inputs = data.normalize(truth.tensors["images"], dump.meta["data"])
    loss = F.cross_entropy(model(inputs), truth.tensors["labels"])
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    return dict(zip(names, grads)), dict(model.named_buffers())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_statistics_do_not_leak_into_the_dump(bn_dumps, mode):
    torch.manual_seed(3)  # the capture's --seed: the same freshly initialised server model
    fresh = models.build(models.make_spec("convnet", (3, 32, 32), 10, width=2))
    fresh_buffers = dict(fresh.named_buffers())
    dumps = [fileformat.read(bn_dumps / mode / f"train-{i:06d}.safetensors", "gradients") for i in (0, 2)]
    for dump in dumps:
        assert dump.meta["capture"]["mode"] == mode
        params = dump.prefixed("param")
        assert params.keys() == dict(fresh.named_parameters()).keys()
        assert all(torch.equal(params[n], p) for n, p in fresh.named_parameters())
        buffers = dump.prefixed("buffer")
        assert buffers.keys() == fresh_buffers.keys() and len(buffers) == 3 * 8
        for name, value in buffers.items():
            assert torch.equal(value, fresh_buffers[name]), name
            if name.endswith("running_mean"):
                assert torch.equal(value, torch.zeros_like(value))
            elif name.endswith("running_var"):
                assert torch.equal(value, torch.ones_like(value))
            else:
                assert name.endswith("num_batches_tracked") and int(value) == 0
    # Both dumps of the run show the same server state.
    first, second = dumps
    for prefix in ("param", "buffer"):
        a, b = first.prefixed(prefix), second.prefixed(prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(first.tensors["grad.classifier.weight"], second.tensors["grad.classifier.weight"])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dump_gradient_is_reproduced_from_its_own_state(bn_dumps, mode):
    for index in (0, 2):
        dump = fileformat.read(bn_dumps / mode / f"train-{index:06d}.safetensors", "gradients")
        truth = fileformat.read(bn_dumps / mode / f"train-{index:06d}.truth.safetensors", "truth")
        assert truth.tensors["images"].shape == (2, 3, 32, 32)
        assert torch.equal(truth.tensors["labels"], dump.tensors["labels"])
        shared = dump.prefixed("grad")
        same_mode, buffers_after = _recompute_grads(dump, truth, mode == "train")
        assert same_mode.keys() == shared.keys()
        for name, grad in same_mode.items():
            assert torch.allclose(grad, shared[name], rtol=1e-4, atol=1e-6), name
        other_mode, _ = _recompute_grads(dump, truth, mode != "train")
        assert not torch.allclose(other_mode["features.conv0.weight"], shared["features.conv0.weight"],
                                  rtol=1e-3, atol=1e-6)
        if mode == "train":  # the recomputation moved its running statistics; the dump's were the server's
            assert not torch.equal(buffers_after["features.bn0.running_mean"], dump.tensors["buffer.features.bn0.running_mean"])
