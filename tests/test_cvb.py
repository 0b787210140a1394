"""CVB, the convolutional variational bottleneck: its shapes, its KL against a hand computation, its
sampling, where it goes, how attacks see it, and train -> capture -> attack through the command line.

The module tests use feature maps of a few pixels; the CLI tests a `cnn` of width 4 on 8x8 images
(CVB: 8 latent channels on a 4x4x4 map, 1,632 parameters).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from attacks.adaptive import layers_from_decoder_on
from attacks.optimization import bottlenecks
from defenses import DefenseStack, stack_from_cli
from defenses.cvb import CVB, ConvolutionalBottleneck, adaptive_channels, cvb_loss
from helpers import DUMP0, TRUTH0, assert_one_line_error, invoke, invoke_ok
from precode_cli import fileformat, models
from precode_cli.errors import UserError
from precode_cli.stages import profiles

SMALL_CNN = ["--model", "cnn", "--width", 4, "--image-size", 8]


def cnn_spec(size: int = 32, **kwargs) -> dict:
    return models.make_spec("cnn", (3, size, size), 10, **kwargs)


# --- the module -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 5, 7), (16, 3, 3), (1, 8, 8)])
def test_output_has_the_input_feature_shape(shape):
    torch.manual_seed(0)
    vb = ConvolutionalBottleneck(shape, channels=3)
    x = torch.randn(2, *shape)
    assert vb(x).shape == x.shape
    assert vb.k == 3 * shape[1] * shape[2]  # one latent Gaussian per channel and position


def test_adaptive_channels_follow_the_authors():
    assert [adaptive_channels(c) for c in (1, 3, 7, 8, 12, 32, 64)] == [8, 8, 8, 4, 6, 16, 32]
    assert ConvolutionalBottleneck((64, 4, 4)).channels == 32


def test_parameter_count_is_encoder_plus_decoder():
    # encoder 5x5 conv C -> 2K without bias, decoder 1x1 conv K -> C without bias: 2*K*C*25 + K*C.
    vb = ConvolutionalBottleneck((32, 16, 16))
    assert sum(p.numel() for p in vb.parameters()) == 2 * 16 * 32 * 25 + 16 * 32 == 26_112


@pytest.mark.parametrize("term", ["gaussian", "authors"])
def test_loss_is_beta_times_the_kl_of_a_hand_computation(term):
    """Mean and std read off one input channel each through the 5x5 kernel's centre tap; KL per position
    0.5 * (mu^2 + sigma^2 - 2 ln sigma - 1) summed over the 2 latent channels, averaged over the 4 positions.
    The authors' term as their code writes it: -0.5 * (1 + sigma - mu^2 - e^sigma) in the same reduction."""
    vb = ConvolutionalBottleneck((2, 2, 2), channels=2, beta=0.1, kl=term)
    weight = torch.zeros_like(vb.encoder.weight)  # [2K=4, C=2, 5, 5]
    weight[0, 0, 2, 2] = 1.0    # mean 0 = x0
    weight[1, 1, 2, 2] = -0.5   # mean 1 = -x1 / 2
    weight[2, 0, 2, 2] = 0.5    # std 0 = softplus(x0 / 2 + x1)
    weight[2, 1, 2, 2] = 1.0
    weight[3, 1, 2, 2] = 3.0    # std 1 = softplus(clip(3 x1, -5, 5))
    with torch.no_grad():
        vb.encoder.weight.copy_(weight)
    x0 = [0.5, -1.0, 2.0, 0.0]
    x1 = [1.0, 2.0, -0.5, 3.0]
    x = torch.tensor([x0, x1]).view(1, 2, 2, 2)
    vb(x)

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    def kl(mu: float, sigma: float) -> float:
        if term == "authors":
            return -0.5 * (1 + sigma - mu * mu - math.exp(sigma))
        return 0.5 * (mu * mu + sigma * sigma - 2 * math.log(sigma) - 1)

    per_position = [
        kl(a, softplus(a / 2 + b)) + kl(-b / 2, softplus(max(-5.0, min(5.0, 3 * b)))) for a, b in zip(x0, x1)
    ]
    expected = 0.1 * sum(per_position) / 4
    assert cvb_loss(nn.Sequential(vb)).item() == pytest.approx(expected, rel=1e-5)


def test_kl_of_a_zero_encoder_is_the_closed_form():
    # mean 0 and std softplus(0) = ln 2 everywhere: K * 0.5 * (ln^2 2 - 2 ln ln 2 - 1) nats per position.
    vb = ConvolutionalBottleneck((3, 4, 4), channels=5, beta=1.0)
    with torch.no_grad():
        vb.encoder.weight.zero_()
    vb(torch.randn(3, 3, 4, 4))
    ln2 = math.log(2)
    assert vb.last_kl.item() == pytest.approx(5 * 0.5 * (ln2**2 - 2 * math.log(ln2) - 1), rel=1e-5)


def test_cvb_loss_before_any_forward_pass_is_an_error():
    with pytest.raises(RuntimeError, match="before a forward pass"):
        cvb_loss(nn.Sequential(ConvolutionalBottleneck((2, 3, 3))))


def test_every_forward_pass_draws_a_fresh_sample_unless_the_noise_is_fixed():
    torch.manual_seed(0)
    vb = ConvolutionalBottleneck((4, 3, 3), channels=2)
    x = torch.randn(2, 4, 3, 3)
    for mode in (vb.train, vb.eval):
        mode()
        assert not torch.allclose(vb(x), vb(x))
    torch.manual_seed(5)
    first = vb(x)
    torch.manual_seed(5)
    assert torch.equal(vb(x), first)  # the global generator decides the draw
    noise = torch.randn(2, 2, 3, 3)
    vb.noise = noise
    fixed = vb(x)
    assert torch.equal(vb(x), fixed)
    vb.noise = noise.flatten(1)  # the attacks' [B, k] form: the same draw
    assert torch.equal(vb(x), fixed)
    vb.noise = torch.zeros(2, vb.k)  # no noise: the decoded mean
    stats = vb.encoder(x)
    assert torch.allclose(vb(x), vb.decoder(stats[:, :2]), atol=1e-6)


def test_a_fixed_draw_reproduces_the_clients_gradient():
    """What ig-noise relies on: with the client's draw, the attacker's replay gives the very gradient shared."""
    torch.manual_seed(1)
    stack = stack_from_cli("cvb")
    model = stack.build_model(cnn_spec(8, width=4))
    (vb,) = bottlenecks(model).values()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    draw = torch.randn(2, vb.k)

    def shared() -> list[torch.Tensor]:
        vb.noise = draw
        try:
            return torch.autograd.grad(stack.loss(model, model(x), y), list(model.parameters()))
        finally:
            vb.noise = None

    first, again = shared(), shared()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    fresh = torch.autograd.grad(stack.loss(model, model(x), y), list(model.parameters()))
    assert not all(torch.allclose(a, b) for a, b in zip(first, fresh))


# --- where it goes, and what is refused --------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs", "place", "feature_shape"), [
    ("cnn", {}, "features.3", (32, 16, 16)),           # conv-ReLU-pool, then CVB before the second conv
    ("lenet", {}, "features.2", (12, 16, 16)),
    ("convnet", {}, "features.conv1", (64, 32, 32)),
    ("resnet18", {"norm": "group"}, "layer1", (64, 32, 32)),  # after the stem, before the first residual stage
])
def test_default_place_is_after_the_first_conv_block(name, kwargs, place, feature_shape):
    stack = stack_from_cli("cvb")
    model = stack.build_model(models.make_spec(name, (3, 32, 32), 10, **kwargs))
    found = bottlenecks(model)
    assert list(found) == [f"{place}.bottleneck"]
    assert found[f"{place}.bottleneck"].feature_shape == feature_shape
    assert stack.specs() == [{"name": "cvb", "params": {"channels": feature_shape[0] // 2, "beta": 0.1, "at": place,
                                                         "kl": "gaussian"}}]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_named_place_and_channels_are_used():
    stack = stack_from_cli("cvb", cvb_at="features.0", cvb_channels=5, cvb_beta=0.01)
    model = stack.build_model(cnn_spec())
    vb = bottlenecks(model)["features.0.bottleneck"]
    assert (vb.feature_shape, vb.channels, vb.beta) == ((3, 32, 32), 5, 0.01)
    assert "features.0.layer.weight" in dict(model.named_parameters())


def test_ig_adaptive_leaves_out_the_decoder_and_everything_after_it():
    model = stack_from_cli("cvb").build_model(cnn_spec())
    assert layers_from_decoder_on(model, (3, 32, 32)) == (
        "features.3.bottleneck.decoder", "features.3.layer", "features.8", "classifier")


@pytest.mark.parametrize(("make", "options", "phrase"), [
    (lambda: models.make_spec("mlp", (3, 8, 8), 10), {}, "no nn.Conv2d layer"),
    (lambda: cnn_spec(8), {"cvb_at": "classifier"}, "shape [512]"),
    (lambda: cnn_spec(8), {"cvb_at": "nowhere"}, "no submodule named 'nowhere' to insert CVB"),
    (lambda: cnn_spec(8), {"cvb_channels": 0}, "--cvb-channels"),
    (lambda: cnn_spec(8), {"cvb_beta": -1.0}, "--cvb-beta"),
])
def test_what_cannot_work_is_refused_in_one_sentence(make, options, phrase):
    with pytest.raises(UserError) as err:
        stack_from_cli("cvb", **options).build_model(make())
    assert phrase in str(err.value) and "\n" not in str(err.value)


def test_ppp_must_not_name_layers_that_cvb_renames_after_it():
    with pytest.raises(UserError, match="list cvb before ppp"):
        stack_from_cli(["ppp", "cvb"])
    stack = stack_from_cli(["cvb", "ppp"], precode_k=8)
    model = stack.build_model(cnn_spec(8, width=4))
    perturbed = stack.specs()[1]["params"]["params"]
    assert "features.3.layer.weight" in perturbed and set(perturbed) <= dict(model.named_parameters()).keys()


def test_a_model_with_one_convolution_needs_a_named_place():
    one_conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(UserError, match="only one convolution"):
        CVB().apply_to_model(one_conv, (3, 8, 8))
    model = CVB(at="1").apply_to_model(one_conv, (3, 8, 8))  # after the conv, before the ReLU
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)


# --- through the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """train -> capture-gradients -> attack (ig, ig-adaptive, ig-noise) for a tiny cnn with CVB."""
    root = tmp_path_factory.mktemp("cvb")
    run, grads = root / "run", root / "grads"
    invoke_ok("train", *SMALL_CNN, "--defense", "cvb", "--epochs", 1, "--subset", 64, "--batch-size", 32,
              "--seed", 0, "--out", run)
    invoke_ok("capture-gradients", run, "--indices", "0:2", "--out", grads)
    for method in ("ig", "ig-adaptive", "ig-noise"):
        invoke_ok("attack", grads, "--method", method, "--iterations", 3, "--out", root / f"recon-{method}")
    return root


CVB_SPEC = [{"name": "cvb", "params": {"channels": 8, "beta": 0.1, "at": "features.3", "kl": "gaussian"}}]


def test_the_run_records_cvb_and_its_weights(pipeline):
    model = fileformat.read(pipeline / "run" / "model.safetensors", "model", profile=profiles.for_files())
    assert model.meta["defense"] == CVB_SPEC
    assert model.tensors["features.3.bottleneck.encoder.weight"].shape == (16, 4, 5, 5)
    assert model.tensors["features.3.bottleneck.decoder.weight"].shape == (4, 8, 1, 1)
    assert "features.3.layer.weight" in model.tensors


def test_the_dump_reads_back_with_the_kl_in_its_loss(pipeline):
    dump = fileformat.read(pipeline / "grads" / DUMP0, "gradients", profile=profiles.for_files())
    assert dump.meta["defense"] == CVB_SPEC and dump.meta["loss"]["includes_vb_kl"] is True
    assert dump.tensors["grad.features.3.bottleneck.encoder.weight"].abs().sum() > 0
    stack = DefenseStack.from_specs(dump.meta["defense"])
    rebuilt = stack.build_model(dump.meta["model"])
    for name, _ in rebuilt.named_parameters():
        assert f"grad.{name}" in dump.tensors or f"factor.{name}.left" in dump.tensors, name


@pytest.mark.parametrize("method", ["ig", "ig-adaptive", "ig-noise"])
def test_each_attack_writes_reconstructions_that_read_back(pipeline, method):
    recon = fileformat.read(pipeline / f"recon-{method}" / DUMP0, "reconstruction")
    assert recon.meta["attack"]["name"] == method and recon.meta["attack"]["completed"]
    assert recon.meta["attack"]["params"]["optimize_noise"] == (method == "ig-noise")
    assert recon.tensors["images"].shape == (1, 3, 8, 8)
    assert torch.isfinite(recon.tensors["images"]).all()
    assert (pipeline / "grads" / TRUTH0).exists()


def test_cvb_options_are_refused_when_capturing_from_the_run(pipeline, tmp_path):
    result = invoke("capture-gradients", pipeline / "run", "--cvb-beta", 0.5, "--out", tmp_path / "g")
    assert_one_line_error(result, "--cvb-beta", "cvb(channels=8, beta=0.1, at=features.3, kl=gaussian)")


def test_cvb_on_an_mlp_is_one_sentence_on_the_command_line(tmp_path):
    result = invoke("capture-gradients", "--model", "mlp", "--width", 8, "--image-size", 8, "--defense", "cvb",
                    "--out", tmp_path / "g")
    assert_one_line_error(result, "no nn.Conv2d layer")


@pytest.mark.parametrize(("params", "phrase"), [
    ({"channels": 0, "beta": 0.1, "at": "features.3"}, "channels"),
    ({"channels": True, "beta": 0.1, "at": "features.3"}, "channels"),
    ({"channels": 8, "beta": -0.1, "at": "features.3"}, "beta"),
    ({"channels": 8, "beta": 0.1, "at": "features.3", "kernel": 3}, "kernel"),
    ({"channels": 9, "beta": 0.1, "at": "features.3"}, "shape"),  # fits the schema, not the tensors
    ({"channels": 8, "beta": 0.1, "at": "features.3", "kl": "bits"}, "kl"),
])
def test_a_dump_with_hostile_cvb_parameters_is_refused(pipeline, tmp_path, params, phrase):
    source = pipeline / "grads" / DUMP0
    with safe_open(str(source), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    meta["defense"] = json.dumps([{"name": "cvb", "params": params}])
    bad = tmp_path / "grads" / DUMP0
    bad.parent.mkdir()
    save_file(tensors, str(bad), metadata=meta)
    shutil.copytree(source.parent / "states", bad.parent / "states")
    with pytest.raises(UserError) as err:
        fileformat.read(bad, "gradients", profile=profiles.for_files())
    assert phrase in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_client_loss_is_cross_entropy_plus_beta_kl():
    torch.manual_seed(2)
    stack = stack_from_cli("cvb", cvb_beta=0.25)
    model = stack.build_model(cnn_spec(8, width=4))
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    logits = model(x)
    (vb,) = bottlenecks(model).values()
    expected = F.cross_entropy(logits, y) + 0.25 * vb.last_kl
    assert stack.loss(model, logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_specs_round_trip_through_a_file_record():
    stack = stack_from_cli("cvb", cvb_channels=3)
    stack.build_model(cnn_spec(8, width=4))
    again = DefenseStack.from_specs(json.loads(json.dumps(stack.specs())))
    assert again.specs() == stack.specs() == [{"name": "cvb", "params": {"channels": 3, "beta": 0.1,
                                                                         "at": "features.3", "kl": "gaussian"}}]
    authors = stack_from_cli("cvb", cvb_kl="authors")
    assert DefenseStack.from_specs(authors.specs()).specs()[0]["params"]["kl"] == "authors"
    with pytest.raises(UserError, match="--cvb-kl must be one of gaussian, authors"):
        stack_from_cli("cvb", cvb_kl="bits")
    assert stack.loss_spec()["includes_vb_kl"] is True
