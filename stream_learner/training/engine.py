"""The step engine: the model, its AdamW, the L2-SP term, and one regularized step.

One step on a micro-batch (:meth:`StepEngine.step`), top to bottom:

1. pad the micro-batch (:func:`~stream_learner.core.batching.collate`) and move it to the device;
2. forward it once (bf16 autocast when the precision says so, ``precision.py``; the loss in fp32);
3. loss = mean cross-entropy over the micro-batch; in a data-parallel group the ranks agree on the
   total and on whether any loss is non-finite (step 2 of the lockstep in ``distributed.py``);
4. backward, add the L2-SP gradient ``2λ(θ_S − θ0_S)``, clip — whose total norm is the guard: a
   non-finite loss or gradient norm (a finite loss can still give a NaN gradient) makes the step a
   skip, decided on the device;
5. the AdamW step, told of the skip (``found_inf``, the protocol of torch's ``GradScaler``: the fused
   kernel leaves weights, moments and step counts untouched), so nothing waits for the host;
6. only then the one host sync of the step: loss, skip, and the fresh examples' predictions and
   losses, packed into one tensor and copied once (pinned memory on CUDA).

On a GPU everything up to step 6 is queued without waiting: about five syncs a step (the guard, three
``.cpu()``, ``loss.item()``) became one, and the scoring the loop does with the outcome (prequential
scores, drift) runs on the host after the step is queued, not between forward and backward.
The objective is ``mean_i L(f(x_i; θ), y_i) + λ‖θ_S − θ0_S‖²`` (L2-SP: Li, Grandvalet & Davoine,
ICML 2018; see ``core/model.py``). The fresh examples come first in the micro-batch: their losses
and predictions, made by the weights *before* the step, are returned as their prequential scores.
Dropout is off (``eval()`` mode), so those scores are exactly the published weights' predictions.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stream_learner.core.batching import Example, collate
from stream_learner.core.config import TrainingSettings
from stream_learner.core.model import L2SP, LoadedModel
from stream_learner.core.replay import StoredExample
from stream_learner.training.distributed import Group
from stream_learner.training.precision import resolve_precision

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has the fused AdamW kernel (CPU since 2.4)


def pick_device(setting: str) -> torch.device:
    """``training.device``: ``auto`` is CUDA when present, else the CPU."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class StepOutcome:
    """What one step computed. ``predictions``, ``labels`` and ``losses`` are of its fresh examples."""

    loss: float  # mean cross-entropy of the micro-batch, NaN when the step was skipped
    skipped: bool  # non-finite loss or gradient norm (on any rank of a group): no update
    predictions: np.ndarray  # int64 [n_fresh], by the weights before the step
    labels: np.ndarray  # int64 [n_fresh]
    losses: np.ndarray  # float32 [n_fresh]
    real_tokens: int  # tokens of the examples
    padded_tokens: int  # examples × the longest of them: what the model computed on


class StepEngine:
    """Owns the model on its device, AdamW and the L2-SP term; takes one step at a time.

    Parameters
    ----------
    loaded
        The model as loaded, with the names of its pretrained parameters (the set S, anchored at their
        current values: θ0) and of its new head.
    training
        ``training.*`` settings: learning rates, weight decay of the head, λ, clipping, precision,
        device, compile.
    pad_id, with_token_types
        The tokenizer's padding id, and whether the model takes ``token_type_ids``.
    group
        The data-parallel group, if any: the model is wrapped in DDP and steps agree across ranks.
    fused
        The fused AdamW kernel where torch has it (the bench's ablation turns it off).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        training: TrainingSettings,
        pad_id: int,
        with_token_types: bool,
        group: Group | None = None,
        fused: bool = True,
    ) -> None:
        t = training
        self.settings, self.group = t, group
        self.pad_id, self.with_token_types = pad_id, with_token_types
        self.device = pick_device(t.device)
        if group is not None:
            self.device = group.device(self.device)
        self.precision = resolve_precision(t.precision, self.device)
        if self.precision.tf32:  # fp32 matmuls on TF32 tensor cores (process-wide, as torch has it)
            torch.set_float32_matmul_precision("high")
        self.model = loaded.model.to(self.device)
        self.model.eval()  # no dropout: prequential scores are those of the published weights
        self.precision.prepare(self.model)
        params = dict(self.model.named_parameters())
        self.pretrained = [params[n] for n in loaded.pretrained]
        head = [params[n] for n in loaded.head]
        self.l2sp = L2SP(self.pretrained, t.l2sp_lambda)  # θ0 = the weights as loaded, before any restore
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.pretrained, "weight_decay": 0.0},  # L2-SP, not decay towards 0
                # a random head needs a larger step than weights that are already good
                {
                    "params": head,
                    "weight_decay": t.head_weight_decay,
                    "lr": t.head_learning_rate or t.learning_rate,
                },
            ],
            lr=t.learning_rate,
            # the fused kernel: one pass over the 22.7M parameters instead of a Python loop over 100
            # tensors (CPU: 0.026 s against 0.22 s per step on one core, docs/performance.md)
            fused=fused and self.device.type in FUSED_ADAMW_DEVICES,
        )
        # what the forward pass goes through: the model, or DDP around it (gradients all-reduced in
        # backward); state_dict, snapshots and the probe use the model itself
        self.forward_model: torch.nn.Module = self.model
        if group is not None:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        if t.compile:  # sequence lengths and micro-batch sizes vary from step to step: dynamic shapes
            self.forward_model = torch.compile(self.forward_model, dynamic=True)
        self._pinned: torch.Tensor | None = None  # _to_host's buffer (CUDA)
        # a rank with nothing to train in a step still takes part in it with this, at weight 0
        self._idle_example = StoredExample(
            input_ids=np.array([pad_id], dtype=np.int64), label=0, pair_start=0
        )

    def bind_thread(self) -> None:
        """Make the engine's device the calling thread's current CUDA device (nothing on the CPU).

        CUDA's current device is per thread: the trainer's own thread starts on cuda:0 whatever the
        main thread set, so on rank 1 of a node autocast, the allocator and NCCL's default device
        would be cuda:0 while DDP holds the model on cuda:1. The trainer thread calls this first.
        """
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def autocast(self) -> AbstractContextManager:
        return self.precision.autocast()

    def step(self, examples: list[Example], n_fresh: int) -> StepOutcome:
        """One step on ``examples``, whose first ``n_fresh`` are fresh events (see the module docstring)."""
        weight = 1.0
        if not examples:  # only in a group: this rank has nothing, yet takes part in the step
            examples, weight = [self._idle_example], 0.0
        host = collate(examples, self.pad_id, self.with_token_types)
        padded_tokens = int(host["attention_mask"].numel()) if weight else 0
        real_tokens = int(host["attention_mask"].sum()) if weight else 0
        labels_host = host["labels"][:n_fresh].numpy()
        if self.device.type == "cuda":  # page-locked memory: the copies below do not block the host
            host = {k: v.pin_memory() for k, v in host.items()}
        batch = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        labels = batch.pop("labels")
        # 2.–3. forward, loss
        with self.autocast():
            logits = self.forward_model(**batch).logits
        per_example = F.cross_entropy(logits.float(), labels, reduction="none")
        loss = per_example.detach().mean()
        bad = ~torch.isfinite(loss)
        objective = per_example.mean()  # what backward differentiates
        if self.group is not None:
            # 2. of the lockstep: the loss scaled so that DDP's average over ranks is the group's mean
            total, bad = self.group.step_totals(len(examples) if weight else 0, bad)
            objective = per_example.sum() * (weight * self.group.world_size / total.clamp(min=1))
        # 4. backward, L2-SP, clip; the guard on the loss and the gradient's norm
        objective.backward()
        self.l2sp.add_gradient_()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        skip = bad | ~torch.isfinite(norm)
        # 5. the update, unless skipped
        self._optimizer_step(skip)
        # gradients dropped, not zeroed: backward then hands each parameter its new gradient instead of
        # adding it to zeros, and nothing fills 91 MB with zeros (bf16 trainer alone, MiniLM, 2-core Xeon
        # with AMX, alternating runs in one process: best 153.8 against 137.3 examples/s; fp32 unchanged)
        self.optimizer.zero_grad(set_to_none=True)
        # 6. the step's one host sync
        n = n_fresh
        scored = logits.detach()[:n]
        packed = torch.cat(
            [
                torch.stack([loss, skip.float()]),
                scored.argmax(-1).float(),
                per_example.detach()[:n],
            ]
        )
        values = self._to_host(packed).numpy()
        skipped = bool(values[1])
        return StepOutcome(
            loss=float("nan") if skipped else float(values[0]),
            skipped=skipped,
            predictions=values[2 : 2 + n].astype(np.int64),
            labels=labels_host.astype(np.int64),
            losses=values[2 + n :].astype(np.float32),
            real_tokens=real_tokens,
            padded_tokens=padded_tokens,
        )

    def _optimizer_step(self, skip: torch.Tensor) -> None:
        """AdamW's step, or none where ``skip`` (a 0-d bool tensor on the device) is true.

        The fused kernel takes the skip as ``found_inf`` — the attribute torch's ``GradScaler`` sets
        on optimizers that support it (``_step_supports_amp_scaling``) — and reads it on the device.
        Another optimizer (the bench's ablation of the fused kernel) is told on the host.
        """
        if getattr(self.optimizer, "_step_supports_amp_scaling", False):
            self.optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
            self.optimizer.grad_scale = None  # type: ignore[attr-defined]
            self.optimizer.step()
        elif not bool(skip):
            self.optimizer.step()

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the host: one copy, through a reused page-locked buffer on CUDA, and one sync."""
        if self.device.type != "cuda":
            return t
        if self._pinned is None or self._pinned.numel() < t.numel():
            self._pinned = torch.empty(max(t.numel(), 256), dtype=t.dtype, pin_memory=True)
        out = self._pinned[: t.numel()]
        out.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return out.clone()

    @torch.no_grad()
    def accuracy(self, examples: list[Example], batch_size: int = 64) -> float:
        """Accuracy of the current weights on ``examples`` (the probe: the poisoning gate's measure)."""
        correct = 0
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i : i + batch_size], self.pad_id, self.with_token_types)
            labels = batch.pop("labels")
            with self.autocast():
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(-1).cpu() == labels).sum())
        return correct / max(len(examples), 1)

    def freeze_pretrained(self) -> None:
        """Only the new head learns: the pretrained weights get no gradient and leave the optimizer
        (no pass over weights that cannot move). The evaluation's ``frozen`` baseline."""
        group = self.optimizer.param_groups[0]
        for p in group["params"]:
            p.requires_grad_(False)
        group["lr"], group["params"] = 0.0, []

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """CPU copies of the model's and the optimizer's state."""
        model_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        opt_state = {
            "state": {
                i: {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in s.items()}
                for i, s in opt["state"].items()
            },
            "param_groups": [dict(g) for g in opt["param_groups"]],
        }
        return model_state, opt_state

    def load_state(self, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
