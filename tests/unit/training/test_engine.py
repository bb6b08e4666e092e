"""The step engine on the CPU: the non-finite guard, the order of scoring, fp32 master weights, the
trainer thread's device (issue 20: the GPU path's findings that a CPU can show)."""

from __future__ import annotations

import copy
import shutil
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stream_learner.core.batching import collate
from stream_learner.core.model import load_model
from stream_learner.training.engine import StepEngine
from tests.support.factories import make_trainer, small_settings, tiny_rows, tokenized
from tests.support.tiny_model import tiny_model_dir


def _engine(fused: bool = True, **sections: dict) -> StepEngine:
    s = small_settings(**sections)
    loop = make_trainer(s)
    if fused:
        return loop.engine
    return StepEngine(_loaded(s), s.training, loop.engine.pad_id, loop.engine.with_token_types, fused=False)


def _loaded(settings):
    return load_model(settings.model, settings.training.seed)


def _events(n: int = 16, start: int = 0):
    return tokenized(tiny_rows(start + n)[start:], small_settings())


def _weights_and_moments(engine: StepEngine) -> dict[str, torch.Tensor]:
    out = {f"w:{k}": v.detach().clone() for k, v in engine.model.state_dict().items()}
    for i, state in engine.optimizer.state_dict()["state"].items():
        for k, v in state.items():
            out[f"m:{i}:{k}"] = v.detach().clone()
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused AdamW", "for-loop AdamW"])
def test_a_nan_gradient_with_a_finite_loss_skips_the_step_and_leaves_everything_finite(fused):
    """Finding 6: only the loss was checked; clipping turned a NaN gradient into NaN everywhere and
    AdamW wrote it into weights and moments, so every later step was skipped too."""
    engine = _engine(fused=fused)
    events = _events(24)
    engine.step(events[:8], 8)  # moments exist
    before = _weights_and_moments(engine)
    victim = engine.model.get_input_embeddings().weight
    hook = victim.register_hook(lambda g: g * float("nan"))  # a finite loss, a NaN gradient
    try:
        out = engine.step(events[8:16], 8)
    finally:
        hook.remove()
    assert out.skipped and np.isnan(out.loss)
    assert np.isfinite(out.losses).all()  # the loss itself was finite: the gradient was not
    after = _weights_and_moments(engine)
    for k, v in before.items():
        assert torch.isfinite(after[k]).all(), k
        assert torch.equal(after[k], v), k  # no update at all, step counts included
    assert all(p.grad is None for p in engine.model.parameters())  # the NaN gradient is not carried over
    # and the next step learns again
    out = engine.step(events[16:24], 8)
    assert not out.skipped and np.isfinite(out.loss)
    assert not torch.equal(engine.model.get_input_embeddings().weight, before[f"w:{_name(engine, victim)}"])


def _name(engine: StepEngine, param: torch.nn.Parameter) -> str:
    return next(k for k, p in engine.model.named_parameters() if p is param)


def test_a_nonfinite_loss_skips_the_step():
    engine = _engine()
    events = _events(8)
    before = _weights_and_moments(engine)
    engine.model.get_input_embeddings().weight.data[0, 0] = float("inf")  # CLS: in every example
    before[f"w:{_name(engine, engine.model.get_input_embeddings().weight)}"][0, 0] = float("inf")
    out = engine.step(events, 8)
    assert out.skipped and np.isnan(out.loss)
    after = _weights_and_moments(engine)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_scores_are_the_weights_before_the_step_and_match_a_plain_computation():
    """Finding 7's reorder: backward and the update are queued before the scores are read; the scores
    are still those of the weights before the step, for the fresh examples only, as computed plainly."""
    engine = _engine()
    events = _events(24)
    engine.step(events[:8], 8)  # not at θ0: a step with moments behind it
    fresh, replayed = events[8:14], events[14:24]
    twin = copy.deepcopy(engine.model)
    batch = collate([*fresh, *replayed], engine.pad_id, engine.with_token_types)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = twin(**batch).logits
    expected = F.cross_entropy(logits, labels, reduction="none")

    out = engine.step([*fresh, *replayed], len(fresh))
    assert not out.skipped
    np.testing.assert_array_equal(out.predictions, logits[: len(fresh)].argmax(-1).numpy())
    np.testing.assert_array_equal(out.labels, labels[: len(fresh)].numpy())
    np.testing.assert_allclose(out.losses, expected[: len(fresh)].numpy(), rtol=1e-5, atol=1e-6)
    assert out.loss == pytest.approx(float(expected.mean()), rel=1e-5)
    assert out.predictions.dtype == np.int64 and out.labels.dtype == np.int64
    assert out.losses.dtype == np.float32 and out.losses.shape == (len(fresh),)
    # and the weights moved: the step was taken after the scores were made
    pairs = zip(twin.parameters(), engine.model.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_a_checkpoint_stored_in_bf16_trains_in_fp32(tmp_path):
    """Finding 5: transformers 5 loads a checkpoint in its stored dtype; a bf16 one gave bf16 master
    weights, θ0 and moments, and an update of lr·g ≈ 1e-5 rounded away (bf16 has 8 bits of mantissa)."""
    from transformers import AutoModel

    src = tiny_model_dir()
    bf16_dir = tmp_path / "bf16-model"
    shutil.copytree(src, bf16_dir)
    stored = AutoModel.from_pretrained(src, dtype=torch.bfloat16)
    stored.save_pretrained(bf16_dir)
    assert AutoModel.from_pretrained(bf16_dir).dtype == torch.bfloat16  # what transformers 5 does

    s = small_settings(model={"name_or_path": str(bf16_dir)}, training={"learning_rate": 1e-5})
    loop = make_trainer(s)
    engine = loop.engine
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
    assert {t.dtype for t in engine.l2sp.theta0} == {torch.float32}
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    out = engine.step(_events(8), 8)
    assert not out.skipped
    moments = [s for st in engine.optimizer.state.values() for k, s in st.items() if k != "step"]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    # a 1e-5 step moves fp32 weights; in bf16 it would round away for every weight above ≈ 2e-3
    moved = sum(int((engine.model.state_dict()[k] != v).sum()) for k, v in before.items())
    assert moved > 0.5 * sum(v.numel() for v in before.values())


def test_the_trainer_thread_binds_its_own_device_first():
    """Finding 1, the CPU twin: CUDA's current device is per thread, so the trainer's thread must set
    its own (``bind_thread``) before it trains — not rely on the main thread having set it."""
    loop = make_trainer(small_settings())
    seen: list[threading.Thread] = []
    original = loop.engine.bind_thread

    def recording() -> None:
        seen.append(threading.current_thread())
        original()

    loop.engine.bind_thread = recording  # type: ignore[method-assign]
    loop.stop_event.set()
    thread = threading.Thread(target=loop.run, name="trainer")
    thread.start()
    thread.join(timeout=30)
    assert seen == [thread]


def test_the_trainer_thread_takes_the_threads_its_builder_handed_over():
    """training/threads.py: the builder's thread computes on one thread, the trainer on the cores —
    two OpenMP teams in one process slowed the trainer by a third (libgomp throttles its spin-waits)."""
    from stream_learner.training.loop import TrainingLoop
    from tests.support.factories import batch

    s = small_settings()
    loop = make_trainer(s)
    loop.threads = 2  # what build_trainer(threads=…) sets
    seen: list[int] = []

    class Threads:
        def on_take(self, queued: int) -> None:
            pass

        def on_step(self, record) -> None:
            seen.append(torch.get_num_threads())
            loop.stop_event.set()

    loop.observers.append(Threads())
    loop.fresh_queue.put(batch(_events(8)))
    before = torch.get_num_threads()
    thread = threading.Thread(target=TrainingLoop.run, args=(loop,), name="trainer")
    thread.start()
    thread.join(timeout=60)
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == before  # the caller's own count is its own
