"""training.precision: forced fp32, forced bf16 and auto, on any CPU (the bf16 path runs everywhere:
autocast emulates bf16 where the CPU lacks it, slower but correct)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.core.batching import collate
from stream_learner.training.precision import (
    FP32_ATTENTION,
    MIN_SPEEDUP,
    NO_NATIVE_BF16,
    NO_NATIVE_BF16_CUDA,
    Precision,
    fp32_attention,
    matmul_gflops,
    native_bf16_cpu,
    resolve_precision,
    startup_gflops,
)
from tests.support.factories import make_trainer, small_settings, tiny_rows, tokenized

CPU = torch.device("cpu")


def never(dtype: torch.dtype) -> float:
    raise AssertionError("no measurement was wanted here")


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
@pytest.mark.parametrize("native", [True, False])
def test_a_forced_precision_is_taken_as_given_without_measuring(setting: str, native: bool) -> None:
    p = resolve_precision(setting, CPU, native=native, measure=never)
    assert p.name == setting and p.gflops is None and "training.precision" in p.reason


CUDA = torch.device("cuda")


@pytest.mark.parametrize("setting", ["auto", "fp32", "bf16"])
@pytest.mark.parametrize("native", [True, False])
def test_on_cuda_bf16_only_where_native_and_tf32_for_fp32_where_it_exists(setting, native) -> None:
    """The decision given a GPU's capability (issue 20, finding 4): torch's ``is_bf16_supported()``
    is true on a T4 or V100, which emulate bf16 slower than fp32; ``auto`` must not take it there."""
    p = resolve_precision(setting, CUDA, native=native, measure=never)
    assert p.bf16 == (setting == "bf16" or (setting == "auto" and native))
    assert p.tf32 == (not p.bf16 and native)  # TF32 tensor cores came with bf16 ones (Ampere)
    if setting == "auto" and not native:
        assert p.reason == NO_NATIVE_BF16_CUDA and p.describe().startswith("fp32: ")
    if p.tf32:
        assert p.describe().startswith("fp32 (TF32 matmuls): ")


def test_auto_on_a_cpu_without_native_bf16_is_fp32_without_measuring() -> None:
    p = resolve_precision("auto", CPU, native=False, measure=never)
    assert not p.bf16 and p.reason == NO_NATIVE_BF16


@pytest.mark.parametrize(
    ("bf16_gflops", "chosen"),
    [(1700.0, "bf16"), (300.0 * MIN_SPEEDUP, "bf16"), (300.0 * MIN_SPEEDUP - 1, "fp32"), (250.0, "fp32")],
)
def test_auto_on_a_native_cpu_follows_the_measurement(bf16_gflops: float, chosen: str) -> None:
    figures = {torch.float32: 300.0, torch.bfloat16: bf16_gflops}
    p = resolve_precision("auto", CPU, native=True, measure=figures.__getitem__)
    assert p.name == chosen and p.gflops == {"fp32": 300.0, "bf16": bf16_gflops}
    line = p.describe()  # what the log says: the choice, why, the figures
    assert line.startswith("bf16 autocast" if chosen == "bf16" else "fp32") and "fp32 300" in line


def test_auto_on_this_cpu_is_consistent_with_its_capabilities() -> None:
    p = resolve_precision("auto", CPU)
    if native_bf16_cpu():
        assert p.gflops is not None and all(v > 0 and math.isfinite(v) for v in p.gflops.values())
        assert p.bf16 == (p.gflops["bf16"] >= MIN_SPEEDUP * p.gflops["fp32"])
    else:
        assert not p.bf16 and p.gflops is None


def test_the_measurement_is_a_finite_positive_rate_taken_once_per_process() -> None:
    rate = matmul_gflops(torch.float32, seconds=0.01)
    assert rate > 0 and math.isfinite(rate)
    assert startup_gflops() is startup_gflops()  # every trainer of a process decides on the same figures


def test_cpu_bf16_autocast_uses_sdpa_math_and_nothing_else_changes() -> None:
    flash = torch.backends.cuda.flash_sdp_enabled()
    with Precision(True, "cpu", "test").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.flash_sdp_enabled() == flash
    with Precision(False, "cpu", "test").autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_a_bf16_step_keeps_fp32_master_weights_and_state_and_learns_like_fp32() -> None:
    losses = {}
    for setting in ("fp32", "bf16"):
        s = small_settings(training={"precision": setting, "seed": 0, "l2sp_lambda": 0.01})
        trainer = make_trainer(s)
        engine = trainer.engine
        assert engine.precision.name == setting
        events = tokenized(tiny_rows(16), s)
        steps = [engine.step(list(events), len(events)) for _ in range(3)]
        assert all(not o.skipped and np.isfinite(o.loss) for o in steps)
        losses[setting] = [o.loss for o in steps]
        # master weights, AdamW's moments and the L2-SP anchor stay fp32
        assert all(p.dtype == torch.float32 for p in engine.model.parameters())
        moments = [v for st in engine.optimizer.state.values() for v in st.values() if v.dim() > 0]
        assert moments and all(v.dtype == torch.float32 for v in moments)
        assert all(t.dtype == torch.float32 for t in engine.l2sp.theta0)
        assert losses[setting][-1] < losses[setting][0]  # three steps on the same batch: it learns
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05)


def test_cpu_bf16_computes_attention_in_fp32_and_publishes_an_unchanged_config() -> None:
    """bf16 on a CPU: the engine's model attends through ``fp32_attention`` (Q, K, V in fp32 under bf16
    autocast, the output back in bf16), whose scores equal plain fp32 SDPA's; fp32 keeps transformers'
    SDPA; the config a version carries names no attention of ours."""
    bf16 = make_trainer(small_settings(training={"precision": "bf16"})).engine
    fp32 = make_trainer(small_settings(training={"precision": "fp32"})).engine
    assert bf16.model.config._attn_implementation == FP32_ATTENTION
    assert fp32.model.config._attn_implementation == "sdpa"
    assert FP32_ATTENTION not in bf16.model.config.to_json_string()
    # the function itself: bf16 inputs under autocast, fp32 arithmetic, bf16 out
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 9, 9)
    mask[1, ..., 6:] = float("-inf")  # the second sequence is 6 tokens and 3 of padding
    module = bf16.model.base_model.encoder.layer[0].attention.self
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fp32_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, scaling=8**-0.5)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), attn_mask=mask
    ).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    assert not torch.equal(out[1, 5], out[0, 5])  # the mask took effect


@functools.cache
def _engine_and_events(setting: str) -> tuple:
    s = small_settings(training={"precision": setting})
    return make_trainer(s).engine, tokenized(tiny_rows(), s)


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_what_stands_in_the_padding_changes_no_real_token_in_any_precision(setting: str, data) -> None:
    """In any padded micro-batch, any tokens in place of the padding leave every real token's
    encoding as it was: the attention each precision computes masks the padding. (bf16's
    fp32_attention once got no mask from transformers, and every token attended to the padding.)"""
    engine, events = _engine_and_events(setting)
    picks = data.draw(st.lists(st.sampled_from(range(len(events))), min_size=2, max_size=8, unique=True))
    batch = collate([events[i] for i in picks], engine.pad_id, engine.with_token_types)
    batch.pop("labels")
    padding = batch["attention_mask"] == 0
    filler = data.draw(st.integers(1000, engine.model.config.vocab_size - 1), label="filler token")
    other = {**batch, "input_ids": batch["input_ids"].masked_fill(padding, filler)}
    with torch.no_grad(), engine.autocast():
        encode = engine.model.base_model
        as_padded, as_filled = (encode(**b).last_hidden_state.float() for b in (batch, other))
    real = ~padding
    torch.testing.assert_close(as_filled[real], as_padded[real], rtol=1e-5, atol=1e-5)
