"""The arithmetic a step runs in: ``training.precision`` resolved on the device at hand.

``fp32`` and ``bf16`` are taken as given. ``auto`` picks the faster precision that trains correctly:

1. CUDA: bf16 autocast on a GPU that computes bf16 natively (compute capability ≥ 8.0: Ampere,
   Hopper and later); fp32 on older ones (T4, V100), which only emulate it — torch's own
   ``is_bf16_supported()`` counts that emulation as support. fp32 on a GPU with TF32 tensor cores
   (capability ≥ 8.0, when fp32 is set) runs its matmuls in TF32 (:attr:`Precision.tf32`).
2. A CPU without native bf16 (neither AVX512-BF16 nor AMX): fp32. Autocast would emulate bf16 there,
   slower than fp32.
3. A CPU with it: a short start-up measurement. A matmul of an encoder's feed-forward shape runs in
   fp32 and in bf16 for about :data:`MEASURE_S` seconds each (:func:`matmul_gflops`). bf16 is chosen
   if it is at least :data:`MIN_SPEEDUP` × faster, otherwise fp32. The figures are logged and
   exported.

In every case the master weights, AdamW's moments, the L2-SP anchor θ0 and the published weights stay
fp32. Autocast only changes the arithmetic of the forward's matmuls; the loss is computed in fp32.

On the CPU, bf16 autocast computes attention in fp32 (:meth:`Precision.prepare`,
:func:`fp32_attention`): the matmuls around it run in bf16, Q, K and V are cast up and SDPA's fused
fp32 kernel computes attention. torch 2.13's fused CPU flash-attention kernel has a bf16 backward
11 × slower than its fp32 one (measured on the bundled 6-layer MiniLM, 32 × 48 tokens, 2-core Xeon
with AMX: 37.6 against 3.4 ms a layer), and SDPA's math backend, the other bf16 path, materialises the
L × L scores: at 512 tokens a bf16 trainer on it ran at 0.57 × fp32 (docs/performance.md, "Long
texts"). Models whose attention cannot be set still get the math backend (:meth:`Precision.autocast`).

Examples
--------
>>> resolve_precision("fp32", torch.device("cpu")).name
'fp32'
>>> p = resolve_precision("auto", torch.device("cpu"), native=False)
>>> p.name, p.reason
('fp32', 'this CPU has no native bf16 (AVX512-BF16 or AMX): autocast would emulate it')
>>> fast = {torch.float32: 300.0, torch.bfloat16: 1700.0}.__getitem__
>>> resolve_precision("auto", torch.device("cpu"), native=True, measure=fast).name
'bf16'
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

#: bf16 is chosen on a CPU only if its matmul is at least this much faster than fp32's.
MIN_SPEEDUP = 1.5
#: Seconds each precision's matmul runs in the start-up measurement.
MEASURE_S = 0.1
NO_NATIVE_BF16 = "this CPU has no native bf16 (AVX512-BF16 or AMX): autocast would emulate it"
NO_NATIVE_BF16_CUDA = "this GPU has no native bf16 (compute capability < 8.0): autocast would emulate it"
#: The measured matmul: a step's tokens × hidden @ hidden × 4·hidden (MiniLM's feed-forward).
MEASURE_SHAPE = (2048, 384, 1536)


#: The name :func:`fp32_attention` is registered under with transformers' ``AttentionInterface``.
FP32_ATTENTION = "stream_learner_fp32_sdpa"


def fp32_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' SDPA attention computed in fp32 whatever autocast says, by the fused kernel where
    it applies; the output cast back to the dtype of ``query`` (bf16 under autocast)."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with (
        torch.autocast(query.device.type, enabled=False),
        sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]),
    ):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(query.dtype), weights


AttentionInterface.register(FP32_ATTENTION, fp32_attention)
# transformers builds a model's attention mask by the name of its attention: a name without a mask
# function gets no mask at all, and every token attended to the padding of its micro-batch
AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)


@dataclass(frozen=True)
class Precision:
    """The precision a trainer runs in, and why."""

    bf16: bool
    device_type: str
    reason: str
    gflops: dict[str, float] | None = None  # the start-up measurement, by precision, when one ran
    tf32: bool = False  # fp32 matmuls on TF32 tensor cores (CUDA, compute capability ≥ 8.0)

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def describe(self) -> str:
        """One line for the log: the precision, why, and the measured figures."""
        figures = ""
        if self.gflops:
            figures = " (matmul " + ", ".join(f"{k} {v:.0f}" for k, v in self.gflops.items()) + " GFLOP/s)"
        name = "bf16 autocast" if self.bf16 else "fp32 (TF32 matmuls)" if self.tf32 else "fp32"
        return f"{name}: {self.reason}{figures}"

    def prepare(self, model: torch.nn.Module) -> None:
        """Set ``model`` up for this precision: with bf16 on a CPU, attention in fp32
        (:func:`fp32_attention`) where the model lets its attention be set (transformers' models with
        SDPA); the config it saves is unchanged."""
        if not (self.bf16 and self.device_type == "cpu"):
            return
        if getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(FP32_ATTENTION)

    def autocast(self) -> AbstractContextManager:
        """The context a forward runs in: bf16 autocast (on the CPU, with SDPA's math backend), or none."""
        if not self.bf16:
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=torch.bfloat16))
        if self.device_type == "cpu":
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack


#: The first CUDA compute capability with bf16 (and TF32) tensor cores: Ampere.
NATIVE_BF16_CUDA = (8, 0)


def native_bf16_cuda(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (compute capability ≥ 8.0), not by emulation."""
    return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CUDA


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as torch's own checks tell."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def matmul_gflops(dtype: torch.dtype, seconds: float = MEASURE_S) -> float:
    """GFLOP/s of a :data:`MEASURE_SHAPE` matmul in ``dtype`` on the CPU: the fastest of the calls
    made in about ``seconds`` (at least three), after two warm-up calls.

    The warm-up pays for the kernel's set-up (AMX's tile configuration, oneDNN's code generation): with
    one, the first bf16 measurement in a fresh process read 0.6 × fp32 on a CPU where bf16 is 6 ×
    faster. The fastest call, not the mean, so that a busy neighbour does not decide the precision.
    """
    m, k, n = MEASURE_SHAPE
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best, runs, start = math.inf, 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2 * m * k * n / best / 1e9


@functools.cache
def startup_gflops() -> tuple[float, float]:
    """fp32's and bf16's :func:`matmul_gflops`, measured once per process: every trainer, and the
    bench's ceilings, resolve ``auto`` on the same figures (and so to the same precision)."""
    return matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)


def resolve_precision(
    setting: str,
    device: torch.device,
    native: bool | None = None,
    measure: Callable[[torch.dtype], float] | None = None,
) -> Precision:
    """``training.precision`` on ``device`` (see the module docstring).

    ``native`` overrides the device's check (:func:`native_bf16_cpu`, :func:`native_bf16_cuda`) and
    ``measure`` the CPU's start-up measurement (tests); without it, the process's :func:`startup_gflops`.

    >>> resolve_precision("auto", torch.device("cuda"), native=False).describe()
    'fp32: this GPU has no native bf16 (compute capability < 8.0): autocast would emulate it'
    >>> resolve_precision("fp32", torch.device("cuda"), native=True).tf32
    True
    """
    kind = device.type
    if kind == "cuda":
        native = native_bf16_cuda(device) if native is None else native
        if setting == "bf16" or (setting == "auto" and native):
            why = "set by training.precision" if setting == "bf16" else "auto: native bf16 on this GPU"
            return Precision(True, kind, why)
        why = "set by training.precision" if setting == "fp32" else NO_NATIVE_BF16_CUDA
        return Precision(False, kind, why, tf32=native)
    if setting in ("fp32", "bf16"):
        return Precision(setting == "bf16", kind, "set by training.precision")
    if not (native_bf16_cpu() if native is None else native):
        return Precision(False, kind, NO_NATIVE_BF16)
    fp32, bf16 = startup_gflops() if measure is None else (measure(torch.float32), measure(torch.bfloat16))
    gflops = {"fp32": fp32, "bf16": bf16}
    speedup = gflops["bf16"] / gflops["fp32"]
    if speedup >= MIN_SPEEDUP:
        return Precision(True, kind, f"native bf16 measured {speedup:.1f} × fp32", gflops)
    return Precision(False, kind, f"native bf16 measured only {speedup:.1f} × fp32 (< {MIN_SPEEDUP})", gflops)
