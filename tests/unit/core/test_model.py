"""L2-SP: equals λ‖θ_S − θ0_S‖² computed naively, is 0 at start, excludes the head (acceptance 4.6)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.core.config import ModelSettings
from stream_learner.core.model import DISTANCE_CHUNK, L2SP, load_model
from tests.support.tiny_model import tiny_model_dir


def tiny(**fields) -> ModelSettings:
    """The tiny random BERT (tests/support/tiny_model.py): a pretrained body without a head, as MiniLM."""
    return ModelSettings(name_or_path=tiny_model_dir(), **fields)


@pytest.fixture(scope="module")
def loaded():
    return load_model(tiny())


def test_head_is_new_and_excluded(loaded):
    assert sorted(loaded.head) == ["classifier.bias", "classifier.weight"]
    assert not set(loaded.head) & set(loaded.pretrained)
    assert any(n.startswith("bert.encoder.layer.0.") for n in loaded.pretrained)
    assert len(loaded.pretrained) + len(loaded.head) == len(list(loaded.model.parameters()))


def test_new_head_is_drawn_from_the_seed_alone():
    """Before, the head took whatever torch's global generator held: a learner's first weights depended
    on what ran before it in the process (a test worker's earlier tests)."""

    def head(seed: int) -> torch.Tensor:
        return dict(load_model(tiny(), seed=seed).model.named_parameters())["classifier.weight"]

    first = head(0)
    torch.manual_seed(12345)
    torch.rand(1000)  # the global generator elsewhere than it was for the first load
    state = torch.get_rng_state()
    assert torch.equal(head(0), first)
    assert torch.equal(torch.get_rng_state(), state)  # left as it was
    assert not torch.equal(head(1), first)


def test_l2sp_zero_at_start_then_equals_naive(loaded):
    params = dict(loaded.model.named_parameters())
    lam = 0.37
    reg = L2SP([params[n] for n in loaded.pretrained], lam)
    assert float(reg.penalty()) == 0.0
    theta0 = {n: params[n].detach().clone() for n in loaded.pretrained}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params.values():  # move every parameter, the head included
            p.add_(0.01 * torch.randn_like(p))
    naive = lam * sum(
        ((params[n].detach().double() - theta0[n].double()) ** 2).sum() for n in loaded.pretrained
    )
    assert float(reg.penalty()) == pytest.approx(float(naive), rel=1e-5)
    assert float(reg.penalty()) > 0
    # the head moved too, but is not part of the term
    with torch.no_grad():
        params["classifier.weight"].add_(100.0)
    assert float(reg.penalty()) == pytest.approx(float(naive), rel=1e-5)


def test_l2sp_gradient_equals_autograd_of_naive_term():
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    lam = 0.5
    reg = L2SP([a, b], lam)
    with torch.no_grad():
        a.add_(torch.randn_like(a))
        b.add_(torch.randn_like(b))
    naive = lam * (((a - reg.theta0[0]) ** 2).sum() + ((b - reg.theta0[1]) ** 2).sum())
    ga, gb = torch.autograd.grad(naive, [a, b])
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    reg.add_gradient_()
    torch.testing.assert_close(a.grad, ga)
    torch.testing.assert_close(b.grad, gb)
    assert float(reg.penalty()) == pytest.approx(float(naive))


def test_lambda_zero_adds_nothing():
    a = torch.nn.Parameter(torch.ones(3))
    reg = L2SP([a], 0.0)
    with torch.no_grad():
        a.add_(1)
    a.grad = torch.zeros_like(a)
    reg.add_gradient_()
    assert torch.count_nonzero(a.grad) == 0 and float(reg.penalty()) == 0.0


def test_a_max_length_over_the_models_positions_is_refused_at_start():
    """model.max_length 1024 on a model of 512 positions (MiniLM's, and the tiny model's): the first long
    event used to stop the trainer with a tensor-size error, and every restart stopped again."""
    from stream_learner.core.config import ConfigError, load_settings
    from stream_learner.core.model import check_max_length

    settings = load_settings(model={"max_length": 1024, "name_or_path": tiny_model_dir()})
    model = load_model(settings.model, seed=0).model
    with pytest.raises(ConfigError) as info:
        check_max_length(settings.model, model)
    line = str(info.value)
    assert "\n" not in line and line.startswith("model.max_length") and "at most 512" in line
    check_max_length(load_settings(model={"max_length": 512, "name_or_path": tiny_model_dir()}).model, model)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3 * DISTANCE_CHUNK), min_size=1, max_size=4),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_squared_distance_is_float64_s_for_any_sizes_and_scales(sizes, scale, seed) -> None:
    """‖θ − θ0‖² taken in chunks is float64's sum of the exact differences within 1e-6 (each float32
    difference is rounded once), for tensors shorter and longer than a chunk and changes from tiny to
    large. A float32 sum of the squares missed that by 1.3e-6."""
    rng = np.random.default_rng(seed)
    theta0 = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    params = [torch.nn.Parameter(t.clone()) for t in theta0]
    reg = L2SP(params, lam=1.0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.from_numpy(rng.standard_normal(p.numel()).astype(np.float32)) * scale)
    exact = sum(((p.detach().double() - t.double()) ** 2).sum() for p, t in zip(params, theta0, strict=True))
    got = reg.squared_distance()
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(float(exact), rel=1e-6)
