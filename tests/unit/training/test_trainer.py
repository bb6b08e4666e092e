"""The training loop and its step engine: steps, guards, offsets, snapshots, windows, the bf16 twin
on the tiny model; learning on the 1-layer MiniLM."""

import dataclasses

import numpy as np
import pytest
import torch

from stream_learner.core.batching import collate
from stream_learner.core.prequential import PrequentialScores
from stream_learner.service.metrics import Metrics, MetricsObserver
from stream_learner.training.observers import LoopObserver, StepLog
from tests.support.factories import (
    batch,
    make_trainer,
    pretrained_settings,
    small_settings,
    tiny_rows,
    tokenized,
)


def step(tr, events):
    """One step of the loop on ``events`` (a window of one micro-batch): its loss."""
    (loss,) = tr.train_window(list(events), steps=1)
    return loss


def metrics(tr) -> Metrics:
    return next(o.metrics for o in tr.observers if isinstance(o, MetricsObserver))


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.engine.model.state_dict().items()}


def test_step_learns_fills_replay_and_moves_from_theta0():
    s = small_settings()
    tr = make_trainer(s)
    events = tokenized(tiny_rows(32), s)
    before = _params(tr)
    loss = step(tr, events[:8])
    assert np.isfinite(loss)
    assert tr.counters.steps == 1 and tr.counters.events_trained == 8
    assert len(tr.replay) == 8
    assert float(tr.engine.l2sp.squared_distance()) > 0
    changed = [k for k, v in _params(tr).items() if not torch.equal(v, before[k])]
    assert "classifier.weight" in changed and any(k.startswith("bert.encoder") for k in changed)
    step(tr, events[8:16])  # now with replay
    assert tr.counters.examples_replayed == 8
    assert metrics(tr).value("stream_learner_steps_total") == 2


def test_training_reduces_loss_on_the_data_it_sees():
    s = pretrained_settings(training={"learning_rate": 1e-3, "replay_per_step": 0, "l2sp_lambda": 0.0})
    tr = make_trainer(s)
    events = tokenized(tiny_rows(16), s)
    first = step(tr, events[:16])
    for _ in range(20):
        last = step(tr, events[:16])
    assert last < 0.5 * first


def test_nonfinite_loss_skips_the_step_and_is_counted():
    s = small_settings()
    tr = make_trainer(s)
    events = tokenized(tiny_rows(8), s)
    with torch.no_grad():
        tr.engine.model.classifier.bias.fill_(float("nan"))
    before = _params(tr)
    assert np.isnan(step(tr, events))
    assert tr.counters.nonfinite_skipped == 1 and tr.counters.steps == 0
    assert metrics(tr).value("stream_learner_nonfinite_steps_skipped_total") == 1
    for k, v in _params(tr).items():
        torch.testing.assert_close(v, before[k], equal_nan=True)
    assert len(tr.replay) == 0


def test_offsets_cover_exactly_the_events_trained():
    s = small_settings(training={"fresh_per_step": 8, "max_wait_s": 0.0})
    tr = make_trainer(s)
    events = tokenized(tiny_rows(12), s, partition=0) + tokenized(tiny_rows(12)[:4], s, partition=1)
    events = events[:6] + events[12:] + events[6:12]  # p0 0..5, p1 0..3, p0 6..11
    tr.fresh_queue.put(batch(events, {0: 12, 1: 4}))
    tr.fresh_queue.put(batch([], {0: 15}))  # three dead-lettered messages after them
    step(tr, tr.take_fresh(8))
    tr.ledger.advance()
    # a snapshot now (mid-batch) must cover the 8 events counted, no more, no less
    assert tr.counters.events_trained == 8 and tr.ledger.covered == {0: 6, 1: 2}
    step(tr, tr.take_fresh(8))
    tr.ledger.advance()
    assert tr.ledger.covered == {0: 12, 1: 4}
    assert tr.take_fresh(8) == []  # the next turn of the loop picks up the all-dead-letter batch
    tr.ledger.advance()
    assert tr.ledger.covered == {0: 15, 1: 4}


def test_a_finished_batch_never_moves_covered_offsets_back():
    s = small_settings(training={"fresh_per_step": 8, "max_wait_s": 0.0})
    tr = make_trainer(s)
    events = tokenized(tiny_rows(12), s)
    tr.accept(batch(events[:6]))  # offsets 0..5
    tr.accept(batch(events[6:]))  # offsets 6..11
    step(tr, tr.take_fresh(8))  # trains 0..7: the first batch is done, the second half-way
    tr.ledger.advance()
    assert tr.counters.events_trained == 8 and tr.ledger.covered == {0: 8}


def test_snapshot_restore_is_exact():
    s = small_settings()
    tr = make_trainer(s)
    events = tokenized(tiny_rows(40), s)
    for i in range(3):
        step(tr, events[i * 8 : (i + 1) * 8])
    snap = tr.snapshot()
    restored = dataclasses.replace(snap, offsets={0: 24}, version=1)
    tr2 = make_trainer(s, restored=restored)
    for k, v in tr.engine.model.state_dict().items():
        torch.testing.assert_close(tr2.engine.model.state_dict()[k], v, rtol=0, atol=0)
    assert tr2.counters == tr.counters and tr2.ledger.covered == {0: 24}
    # θ0 stays the pretrained weights, not the restored ones
    assert float(tr2.engine.l2sp.squared_distance()) == pytest.approx(
        float(tr.engine.l2sp.squared_distance())
    )
    # the next step is identical: same replay draw, same optimizer moments
    assert step(tr2, events[24:32]) == pytest.approx(step(tr, events[24:32]), abs=1e-6)
    for k, v in tr.engine.model.state_dict().items():
        torch.testing.assert_close(tr2.engine.model.state_dict()[k], v)


@pytest.mark.slow(seconds=38)  # compiling even a one-layer model's forward and backward
def test_compiled_forward_trains_like_eager(tmp_path, monkeypatch):
    """``training.compile``: the same steps give the same losses, predictions and weights as eager, up to
    the rounding of inductor's fused kernels (its cache in a fresh directory: a cold compile, as at start).

    Measured (torch 2.13.0, transformers 5.25.0, training.seed 0–3), compiled against eager: step losses
    rel ≤ 1.7e-7; held-out logits ‖Δ‖/‖z‖ ≤ 2.3e-7, every argmax the same; weights ‖Δ‖/‖W‖ ≤ 5.2e-6 for
    the whole model and ≤ 2.2e-5 for any one tensor but the key biases (below), and ‖Δ‖/‖W − W₀‖, the
    share of the three steps' update that differs, ≤ 5.3e-3. Training otherwise is far outside that:
    with compiled's optimizer step skipped, step 2's loss is off by rel 1.6e-2 and the update share is
    1.0; with its learning rates × 1.1, 1.5e-3 and 0.10; × 1.01, 1.5e-4 and 0.013.
    """
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    # the 1-layer MiniLM: the tolerances below were measured on its weights
    s = pretrained_settings()
    eager = make_trainer(s)
    theta0 = _params(eager)
    compiled = _restored_twin(eager, pretrained_settings(training={"compile": True}))  # the same head
    assert compiled.engine.forward_model is not compiled.engine.model
    assert eager.engine.forward_model is eager.engine.model
    rows = tiny_rows(24 + 64)
    for part in (rows[:8], rows[8:14], rows[14:24]):  # three lengths and batch sizes: dynamic shapes
        events = tokenized(part, s)
        scores = [tr.engine.step(list(events), len(events)) for tr in (eager, compiled)]
        losses = [o.loss for o in scores]
        assert np.isfinite(losses[0]) and losses[1] == pytest.approx(losses[0], rel=2e-5)
        np.testing.assert_allclose(scores[1].losses, scores[0].losses, rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(scores[1].predictions, scores[0].predictions)

    # the weights as trained predict alike: logits on 64 events neither saw
    held_out = collate(tokenized(rows[24:], s), eager.engine.pad_id, eager.engine.with_token_types)
    held_out.pop("labels")
    with torch.no_grad():
        z_eager, z_compiled = (tr.engine.model(**held_out).logits for tr in (eager, compiled))
    assert float((z_compiled - z_eager).norm() / z_eager.norm()) < 1e-4
    top2 = z_eager.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5  # a near-tie may flip on rounding
    assert bool(clear.any())
    assert torch.equal(z_compiled.argmax(-1)[clear], z_eager.argmax(-1)[clear])

    # and the weights themselves, relative to their norm and to the update the steps made
    trained = compiled.engine.model.state_dict()
    squares = np.zeros(3)  # Σ ‖Δ‖², Σ ‖W − W₀‖², Σ ‖W‖² over the model's tensors
    for k, w in eager.engine.model.state_dict().items():
        if not w.is_floating_point():
            continue
        d = trained[k] - w
        squares += [float(d.norm()) ** 2, float((w - theta0[k]).norm()) ** 2, float(w.norm()) ** 2]
        # Adam turns a gradient of pure rounding noise into a whole step of ±lr: the key biases' gradient
        # is exactly 0 (a bias on every key shifts a query's scores equally: softmax ignores it), so their
        # steps are all noise, ‖Δ‖ of the order of their whole update; the sums below still hold them
        if not k.endswith("attention.self.key.bias"):
            assert float(d.norm() / w.norm()) < 1e-3, k
    diff, update, norm = np.sqrt(squares)
    assert diff / norm < 5e-5
    assert diff / update < 0.05


def test_collate_pads_and_sets_token_types():
    s = small_settings()
    events = tokenized(tiny_rows(3), s)
    b = collate(events, pad_id=0, with_token_types=True)
    lengths = [len(e.input_ids) for e in events]
    assert b["input_ids"].shape == (3, max(lengths))
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert int(b["token_type_ids"].sum()) == 0


def test_prequential_window_macro_f1():
    w = PrequentialScores(size=4)
    w.add([1, 1, 0, 0, 1], [1, 0, 0, 0, 1], [0.1] * 5)  # window keeps the last 4
    out = w.summary()
    assert out["prequential_accuracy"] == 0.75
    # window: preds [1,0,0,1], labels [0,0,0,1]; F1(class 0) = 2·2/(2+3), F1(class 1) = 2·1/(2+1)
    assert out["prequential_f1"] == pytest.approx((2 * 2 / (2 + 3) + 2 * 1 / (2 + 1)) / 2)
    assert w.run_accuracy == 0.8


# --------------------------------------------------------------------- length-bucketed windows
def _restored_twin(tr, settings):
    """A second trainer in exactly ``tr``'s state (same head initialisation, optimizer, replay, RNG)."""
    return make_trainer(settings, restored=dataclasses.replace(tr.snapshot(), version=1))


def test_a_window_is_its_micro_batches_stepped_in_turn():
    """Bucketing only regroups: each fresh event is scored by the weights before the step that learns it."""
    s = small_settings(training={"fresh_per_step": 4, "replay_per_step": 0, "bucket_window": 4})
    tr = make_trainer(s)
    twin = _restored_twin(tr, s)
    events = tokenized(tiny_rows(16), s)
    log = StepLog()
    tr.observers.append(log)
    records = log.records
    losses = tr.train_window(events)
    assert len(losses) == len(records) == 4 and tr.counters.steps == 4
    offsets = [e.offset for r in records for e in r.fresh]
    assert sorted(offsets) == list(range(16)) and offsets != sorted(offsets)  # reordered by length
    lengths = [len(e.input_ids) for r in records for e in r.fresh]
    assert lengths == sorted(lengths)
    for record, loss in zip(records, losses, strict=True):
        again = twin.engine.step(list(record.fresh), len(record.fresh))
        assert again.loss == pytest.approx(loss, abs=1e-6)
        np.testing.assert_allclose(again.losses, record.losses, atol=1e-6)


def test_snapshots_between_windows_cover_exactly_the_events_trained():
    """The lineage guarantee with reordering: every snapshot's offsets are the trained prefix.

    One partition, offsets 0..n-1, no dead letters: a snapshot must cover ``events_trained`` offsets
    exactly. Taken inside a window, it would cover more (a later, shorter event already trained).
    """
    import contextlib
    import queue
    import threading

    s = small_settings(
        training={"fresh_per_step": 4, "replay_per_step": 2, "bucket_window": 4, "max_wait_s": 0.05},
        # a snapshot is due after every step (by time): only the window boundaries may let it out
        publish={"every_steps": 1000, "every_seconds": 0.001},
    )
    tr = make_trainer(s)
    events = tokenized(tiny_rows(48), s)
    log = StepLog()
    tr.observers.append(log)
    records = log.records
    for i in range(0, 48, 16):
        tr.fresh_queue.put(batch(events[i : i + 16]))
    snapshots = []

    def drain():
        while thread.is_alive() or not tr.publish_queue.empty():
            with contextlib.suppress(queue.Empty):
                snapshots.append(tr.publish_queue.get(timeout=0.05))

    thread = threading.Thread(target=tr.run)
    drainer = threading.Thread(target=drain)
    thread.start()
    drainer.start()
    while tr.counters.events_trained < 48 and thread.is_alive():
        thread.join(0.1)
    tr.stop_event.set()
    thread.join(60)
    drainer.join(60)
    assert not thread.is_alive() and tr.counters.events_trained == 48
    offsets = [e.offset for r in records for e in r.fresh]
    assert offsets != sorted(offsets), "the windows did not reorder anything: the test proves nothing"
    assert len(snapshots) >= 2
    for snap in snapshots:
        assert snap.offsets.get(0, 0) == snap.counters.events_trained
    assert snapshots[-1].offsets == {0: 48}


def test_a_snapshot_inside_a_window_is_refused():
    s = small_settings(training={"fresh_per_step": 4, "replay_per_step": 0, "bucket_window": 2})
    tr = make_trainer(s)
    refused = []

    class SnapshotNow(LoopObserver):
        def on_step(self, record):
            with pytest.raises(RuntimeError, match="inside a bucketed window"):
                tr.snapshot()
            refused.append(True)

    tr.observers.append(SnapshotNow())
    tr.train_window(tokenized(tiny_rows(8), s))
    assert len(refused) == 2
    tr.snapshot()  # between windows it is fine


def test_bucketed_windows_pad_less_than_plain_micro_batches():
    def padding_efficiency(window: int) -> float:
        s = small_settings(training={"fresh_per_step": 8, "replay_per_step": 8, "bucket_window": window})
        tr = make_trainer(s)
        events = tokenized(tiny_rows(96), s)
        for e in events[64:]:
            tr.replay.add(e.input_ids, e.label)
        log = StepLog()
        tr.observers.append(log)
        records = log.records
        for i in range(0, 64, 8 * window):
            tr.train_window(events[i : i + 8 * window])
        assert sum(len(r.fresh) for r in records) == 64 and len(records) == 8
        return sum(r.real_tokens for r in records) / sum(r.padded_tokens for r in records)

    plain, bucketed = padding_efficiency(1), padding_efficiency(4)
    assert 0 < plain < bucketed <= 1


def test_a_window_ends_where_a_publish_falls_due():
    """Snapshots wait for a window's end: windows shrink so that publish.every_steps keeps its cadence."""
    s = small_settings(training={"bucket_window": 8}, publish={"every_steps": 5})
    tr = make_trainer(s)
    per_step = s.training.fresh_per_step
    assert tr._window_size() == 5 * per_step
    tr.counters.steps = 3
    assert tr._window_size() == 2 * per_step
    tr.counters.steps = 5  # due now; if the publisher is busy the snapshot waits, the windows do not
    assert tr._window_size() == 8 * per_step
    tr.maybe_publish()
    assert tr._window_size() == 5 * per_step


def test_a_snapshot_carries_the_produce_times_learned_since_the_last_one_handed_over():
    """The freshness record: each version's manifest counts the events new in it — none lost when the
    publisher is busy (the snapshot refused), none counted in two versions."""
    s = small_settings(publish={"every_steps": 1})
    tr = make_trainer(s)
    rows = tiny_rows(24)
    t0 = 1_700_000_000_000
    step(tr, tokenized(rows[:8], s, timestamp_ms=t0 + 300))
    tr.ledger.advance()
    assert tr.maybe_publish()
    first = tr.publish_queue.get_nowait()
    assert first.event_times.to_manifest() == {"resolution_s": 1, "counts": [[t0 // 1000, 8]]}
    assert first.counters.newest_event_ms == t0 + 300
    step(tr, tokenized(rows[8:16], s, first_offset=8, timestamp_ms=t0 + 5_000))
    tr.ledger.advance()
    tr.publish_queue.put_nowait(first)  # the publisher still busy with the previous version
    assert not tr.maybe_publish()
    step(tr, tokenized(rows[16:], s, first_offset=16, timestamp_ms=t0 + 9_000))
    tr.ledger.advance()
    tr.publish_queue.get_nowait()
    assert tr.maybe_publish()
    second = tr.publish_queue.get_nowait()
    assert second.event_times.to_manifest()["counts"] == [[t0 // 1000 + 5, 8], [t0 // 1000 + 9, 8]]
    assert second.counters.newest_event_ms == t0 + 9_000
    step(tr, tokenized(rows[:8], s, first_offset=24, timestamp_ms=t0 - 60_000))  # produced earlier
    assert tr.snapshot().counters.newest_event_ms == t0 + 9_000  # the lineage's newest stays
