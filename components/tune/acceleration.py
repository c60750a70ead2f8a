"""Two speed-ups of the training forward and backward that change no result.

- :class:`FusedLoraLinear`: PEFT's LoRA linear layer (same parameters, same saved adapter) whose
  adapter goes inside the matrix multiplies: in float32 merged into the weight for the product
  (one large product per pass), in bf16 as one ``addmm`` into the base layer's output. PEFT
  computes ``B(A x)`` as a full-size tensor, multiplies it by ``s`` and adds it: two more
  passes over every linear layer's output, forward and backward. It is plugged in through PEFT's
  custom-module API (``LoraConfig._register_custom_module``) and falls back to PEFT's forward
  whenever anything other than one plain LoRA adapter is active.
- :func:`compile_decoder_layers`: ``torch.compile`` of every decoder layer (dynamic shapes: the
  packed rows change length every step), which fuses the element-wise work around the matrix
  multiplies (RMSNorm, rotary embeddings, SiLU, residuals, LoRA scaling) into a few C++ loops.
  The packed attention stays outside the compiled graphs. The trainer compiles in a warm-up
  before the first step (its own phase in the log).

When compiling pays (``compile="auto"``, :func:`wants_compile`), measured on the embedded
SmolLM2-135M, LoRA rank 8, a batch of 8 examples, 2 cores, empty Inductor cache:

- AVX2 CPU (AMD EPYC, no AMX), float32, with the C attention kernel
  (``components.common.fast_attention``), eager and compiled models taking turns in one process
  on the same batches of ``benchmarks/bench_tune.py``'s job (``benchmarks/bench_compile.py``):
  a warm-up of 51 s, then a step's forward and backward in 14.86 s compiled against 15.48 eager
  (medians of 8 pairs, 4% faster): it pays after 83 steps. Two more runs: 16.53 against 18.24 s
  after 55.6 s (10%, pays after 33 steps), 17.13 against 21.91 s after 58.6 s (5 pairs, 28%,
  after 12). Two such comparisons by hand, on the first batch only (2318 tokens), gave 5% and
  7% after a 46 s warm-up. (Before the attention kernel the element-wise work was a smaller
  share of the step, and two sequential runs measured -2% to +17%, within the machine's drift.)
- AMX CPU, bfloat16 (measured by the earlier ``bench_tune`` work on such a machine, not re-run
  since): compiled steps about a third faster (about 1.0 -> 0.67 s/step) for a warm-up of 30 s
  (Inductor cache warm) to about a minute (cold): it pays after 100 to 180 steps.

So ``auto`` compiles on a CPU, in either precision, for runs of at least ``COMPILE_MIN_STEPS``
(200) steps: past every break-even measured, so it does not make a run slower even with a cold
cache.
"""
from __future__ import annotations

import shutil

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

COMPILE_MODES = ("auto", "on", "off")
COMPILE_MIN_PARAMETERS = 50_000_000  # "auto": smaller models train too fast to repay compiling
COMPILE_MIN_STEPS = 200  # "auto": fewer steps do not repay the warm-up (see the module doc)


class _LoraLinearFunction(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` with the adapter inside the matrix multiplies.

    In float32 the adapter is merged into the weight for the product: ``y = x (W + s B A)^T + b``
    forward, ``dx = dy (W + s B A)`` backward (the merged weight is recomputed, not kept), so
    each pass is one large product; only the adapter gradients, ``dA = s (dy B)^T x`` and
    ``dB = s (x A^T)^T dy`` transposed, take rank-``r`` products. The skinny products the
    unmerged form needs on every pass (``x A^T``, ``+= low B^T``, ``dy B``, ``+= dlow A``) ran
    at 1-10 GFLOP/s on a 2-core AVX2 CPU, against about 100 for the large ones: a LoRA layer of
    SmolLM2's MLP (2444 tokens, 576 -> 1536) took 79 ms forward and backward merged against
    95-126 unmerged (``dy^T low`` alone took up to 50 ms; ``(low^T dy)^T`` is the same numbers
    at half that).

    In bf16 (under autocast) the adapter stays out of the weight, which would round it away
    (``s B A`` is far below a bf16 weight's precision): ``addmm_`` of ``s (x A^T)`` into
    ``x W^T`` forward, ``dx = dy W + s (dy B) A`` backward, the adapter weights cast to bf16 as
    autocast would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        dtype = x.dtype
        merge = dtype == torch.float32 and weight.dtype == torch.float32
        ctx.merge, ctx.scaling = merge, scaling
        if merge:
            y = F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias)
            ctx.save_for_backward(x, weight, lora_a, lora_b)
            return y
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        low_rank = F.linear(x, a) * scaling  # [n, r]
        y = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        y.addmm_(low_rank, b.t())  # in place: torch.addmm would first copy y
        ctx.save_for_backward(x, weight, lora_a, lora_b, low_rank)
        return y

    @staticmethod
    def backward(ctx, d_y):
        scaling = ctx.scaling
        if ctx.merge:
            x, weight, lora_a, lora_b = ctx.saved_tensors
            d_x = (d_y @ torch.addmm(weight, lora_b, lora_a, alpha=scaling)
                   if ctx.needs_input_grad[0] else None)
            d_low_rank = F.linear(d_y, lora_b.t().contiguous())  # [n, r]
            d_a = (d_low_rank.t() @ x).mul_(scaling)
            d_b = (F.linear(x, lora_a).t() @ d_y).t().mul_(scaling)
            return d_x, None, None, d_a, d_b, None
        x, weight, lora_a, lora_b, low_rank = ctx.saved_tensors
        dtype = d_y.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        d_low_rank = (d_y @ b) * scaling  # [n, r]
        d_x = (d_y @ weight.to(dtype)).addmm_(d_low_rank, a) if ctx.needs_input_grad[0] else None
        d_a = (d_low_rank.t() @ x).to(lora_a.dtype)
        d_b = (low_rank.t() @ d_y).t().to(lora_b.dtype)
        return d_x, None, None, d_a, d_b, None


class FusedLoraLinear(LoraLinear):
    """PEFT's ``lora.Linear`` with the adapter's output added inside matrix multiplies."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self.active_adapters
        base = self.base_layer
        plain = (not self.disable_adapters and not self.merged and len(adapters) == 1
                 and adapters[0] in self.lora_A and adapters[0] not in self.lora_variant
                 and isinstance(self.lora_dropout[adapters[0]], torch.nn.Identity)
                 and isinstance(base, torch.nn.Linear) and not base.weight.requires_grad
                 and not args and not kwargs)
        if not plain:
            return super().forward(x, *args, **kwargs)
        adapter = adapters[0]
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        flat = x.reshape(-1, x.shape[-1])
        y = _LoraLinearFunction.apply(flat, base.weight, base.bias, self.lora_A[adapter].weight,
                                      self.lora_B[adapter].weight, self.scaling[adapter])
        return y.view(*x.shape[:-1], y.shape[-1])


def lora_config(rank: int, target_modules):
    """Tunepipe's LoRA configuration (alpha = 2 x rank, no dropout) with fused linear layers."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=target_modules, task_type="CAUSAL_LM")
    config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    return config


def wants_compile(mode: str, model: torch.nn.Module, runtime, packed: bool, steps: int) -> bool:
    """Whether to compile: ``on``/``off``, or ``auto``: only where it was measured to pay for its
    warm-up within the run (see the module doc): a CPU with a C++ compiler, a packed model of at
    least ``COMPILE_MIN_PARAMETERS`` parameters, and at least ``COMPILE_MIN_STEPS`` steps. CUDA
    and XLA runs compile only when asked."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    parameters = sum(p.numel() for p in model.parameters())
    return (runtime.device.type == "cpu" and packed
            and parameters >= COMPILE_MIN_PARAMETERS and steps >= COMPILE_MIN_STEPS
            and (shutil.which("c++") or shutil.which("g++")) is not None)


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compiles the decoder layers of a transformers model (or PEFT model) in place, all but the
    first: its input (the embeddings) needs no gradient, which would take graphs of its own for
    1/layers of the gain. Returns how many it compiled."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in layer_classes][1:]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compiled_token_loss():
    """:func:`components.common.packing.token_loss` compiled: the float32 cast, log-sum-exp, target
    gather and argmax over the vocabulary fused into a few passes (the same numbers)."""
    from components.common.packing import token_loss

    return torch.compile(token_loss, dynamic=True)
