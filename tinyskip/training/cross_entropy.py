"""Cross-entropy over an 8k vocabulary without materialising what it does not need.

At the widths tinyskip trains (d = 128..256) one exit's head and cross-entropy cost about
as much as all the blocks, and early-exit training runs several exits per step. Three
autograd functions keep that cost down:

- ``ChunkedCrossEntropy``: per-row NLL of logits that already exist (exit modules'
  distillation needs them), in fp32 a chunk of rows at a time, never an fp32 copy of the
  whole (N, V) tensor.
- ``LinearCrossEntropy``: per-row NLL of ``h @ W.T`` straight from the hidden states. The
  (N, V) logits are made one chunk of rows at a time and dropped; the backward pass
  recomputes each chunk (one extra N x d x V product) instead of keeping N x V logits and
  their gradient in memory, so the whole loss runs in cache.
- ``LinearDistilledCrossEntropy``: per-row NLL and KL(teacher || student) of the early
  exits' hidden states at shared positions against the teacher's distribution
  (made once by ``teacher_distribution`` from the last exit through the same head:
  self-distillation), chunked the same way, each chunk's student logits shared by both
  losses.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row NLL (c,) of logits (c, V) of any dtype, computed in fp32 (one fused
    log-softmax kernel: about twice as fast on the CPU as ``logsumexp`` of the same rows)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _softmax_minus_onehot(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d NLL / d logits of rows (c, V), computed in fp32 and rounded once to the logits'
    dtype, as autograd's own cross-entropy gradient is: subtracting the one-hot in bf16
    would zero the target's gradient wherever its probability rounds to 1."""
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)
    p[torch.arange(p.shape[0], device=p.device), targets] -= 1
    return p.to(logits.dtype)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row NLL of logits (N, V) in any dtype, computed in fp32 a chunk of rows at a time.

    Same values as ``F.cross_entropy(logits.float(), targets, reduction="none")``, and
    the backward pass (softmax - one-hot) runs chunk by chunk in cache.
    """

    CHUNK = 256

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = ChunkedCrossEntropy.CHUNK
        nll = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], c):
            nll[s:s + c] = _nll(logits[s:s + c], targets[s:s + c])
        ctx.save_for_backward(logits, targets)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, targets = ctx.saved_tensors
        c = ChunkedCrossEntropy.CHUNK
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], c):
            g = _softmax_minus_onehot(logits[s:s + c], targets[s:s + c])
            grad[s:s + c] = g.mul_(grad_nll[s:s + c, None].to(g.dtype))
        return grad, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a product of x on its device (x's own without it)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row NLL (N,) of logits ``h @ weight.T`` (h (N, d), weight (V, d)), in fp32.

    The products run in ``dtype`` (what autocast picks for them, bf16 under
    ``train.bf16``), the softmax in fp32, as in ``ChunkedCrossEntropy``. The incoming
    per-row gradient scales the (c, d) operands rather than the (c, V) softmax: the same
    product, a 60th of the elementwise work at d=128. Gradients come back in the inputs'
    own dtypes (fp32 master weights get an fp32 gradient, summed over chunks in fp32).
    Call through ``linear_cross_entropy``.
    """

    # Rows per chunk: measured on this machine (2 cores, 1 MiB L2 each) at d=128, V=8k,
    # bf16, 6k rows: 128 rows (a 2 MiB bf16 chunk) beat 64 by 17% and 256..1024 by 20-50%.
    CHUNK = 128

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        c = LinearCrossEntropy.CHUNK
        hc, wc = h.to(dtype), weight.to(dtype)
        nll = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], c):
            nll[s:s + c] = _nll(hc[s:s + c] @ wc.T, targets[s:s + c])      # (c, V) dropped
        ctx.save_for_backward(h, weight, targets)
        ctx.dtype = dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        h, weight, targets = ctx.saved_tensors
        c = LinearCrossEntropy.CHUNK
        hc, wc = h.to(ctx.dtype), weight.to(ctx.dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, h.shape[0], c):
            g = _softmax_minus_onehot(hc[s:s + c] @ wc.T, targets[s:s + c])   # (c, V) again
            scale = grad_nll[s:s + c, None]                                    # (c, 1)
            grad_h[s:s + c] = (g @ wc) * scale                                 # (c, d)
            grad_w += (g.T @ (hc[s:s + c] * scale.to(ctx.dtype))).float()      # (V, d)
        return grad_h, grad_w.to(weight.dtype), None, None


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
            ) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2 over the last dimension, in
    fp32 (the T^2 keeps gradient magnitudes independent of T); shapes broadcast."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature ** 2


def _distill_values(z: torch.Tensor, p_t: torch.Tensor, neg_entropy: torch.Tensor,
                    targets: torch.Tensor, temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL and KL(p_t || p_s) * T^2 (c,) of student logits z (c, V) against the
    teacher's probabilities at T (c, V) and their sum(p_t log p_t) (c,), in fp32:
    KL = sum(p_t log p_t) - sum(p_t log p_s), so the teacher's logarithm is taken once
    for every exit. At T = 1 one log-softmax serves both losses."""
    zf = z.float()
    log_p = F.log_softmax(zf / temperature, dim=-1)
    if temperature == 1.0:
        nll = -log_p.gather(1, targets[:, None]).squeeze(1)
    else:
        nll = F.cross_entropy(zf, targets, reduction="none")
    return nll, (neg_entropy - (p_t * log_p).sum(-1)) * temperature ** 2


def _distill_grad(z: torch.Tensor, p_t: torch.Tensor, targets: torch.Tensor,
                  grad_nll: torch.Tensor, grad_kl: torch.Tensor, temperature: float
                  ) -> torch.Tensor:
    """d (grad_nll . NLL + grad_kl . KL T^2) / dz (c, V): g_nll * (softmax(z) - onehot)
    + g_kl * T * (softmax(z / T) - p_t), in fp32, rounded once to z's dtype (as in
    ``_softmax_minus_onehot``); at T = 1 one softmax serves both terms."""
    zf = z.float()
    p = torch.softmax(zf, dim=-1)
    if temperature == 1.0:
        g = p * (grad_nll + grad_kl)[:, None] - p_t * grad_kl[:, None]
    else:
        g = p * grad_nll[:, None] + (torch.softmax(zf / temperature, dim=-1) - p_t) * (
            grad_kl * temperature)[:, None]
    g[torch.arange(g.shape[0], device=g.device), targets] -= grad_nll
    return g.to(z.dtype)


@functools.cache
def _compiled(kernel):
    """The kernel as fused inductor loops, for any row count: its eager ops each sweep
    (c, V) fp32 intermediates (eager, the distilled pass ran 1.2x as long on the quality
    preset's shapes, 2 threads)."""
    return torch.compile(kernel, dynamic=True)


def _teacher_values(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(z / T) (c, V) and its sum(p log p) (c,), in fp32, of teacher logits z."""
    log_p = F.log_softmax(z.float() / temperature, dim=-1)
    p = log_p.exp()
    return p, (p * log_p).sum(-1)


def teacher_distribution(t: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
                         compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(t W^T / T) (N, V) and its sum(p log p) (N,), in fp32, of teacher rows t
    (N, d), without gradient: the distillation target, made once and read by every exit
    that learns from it (the head's product in autocast's dtype, as the students';
    ``compiled`` as in ``LinearDistilledCrossEntropy``)."""
    dtype, c = _compute_dtype(t), LinearCrossEntropy.CHUNK
    values = _compiled(_teacher_values) if compiled else _teacher_values
    probs = torch.empty(t.shape[0], weight.shape[0], dtype=torch.float32, device=t.device)
    neg_entropy = torch.empty(t.shape[0], dtype=torch.float32, device=t.device)
    with torch.no_grad(), torch.autocast(t.device.type, enabled=False):
        tc, wc = t.to(dtype), weight.to(dtype)
        for s in range(0, t.shape[0], c):
            probs[s:s + c], neg_entropy[s:s + c] = values(tc[s:s + c] @ wc.T, temperature)
    return probs, neg_entropy


class LinearDistilledCrossEntropy(torch.autograd.Function):
    """Per-row NLL (k, N) and KL(p_t || softmax(h W^T / T)) * T^2 (k, N) of k exits' student
    rows h (k, N, d) at the same N positions, against targets (N,) and the teacher there
    (``teacher_distribution``: its probabilities (N, V) and sum(p log p) (N,)), one head
    weight (V, d): the earlier exits' cross-entropy and self-distillation in one pass,
    each student chunk's logits made once for both (a separate KL would make them
    again). The teacher is a constant made once for all k exits: no gradient reaches it,
    nor W through it.

    Products and dtypes as in ``LinearCrossEntropy``; ``compiled``: the elementwise work of
    each chunk through ``torch.compile`` (the trainer asks for it when its blocks
    compiled). Call through ``linear_distilled_cross_entropy``.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, p_t: torch.Tensor, neg_entropy: torch.Tensor,
                weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                dtype: torch.dtype, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        c = LinearCrossEntropy.CHUNK
        values = _compiled(_distill_values) if compiled else _distill_values
        hc, wc = h.to(dtype), weight.to(dtype)
        nll = torch.empty(h.shape[:2], dtype=torch.float32, device=h.device)
        kl = torch.empty_like(nll)
        for e in range(h.shape[0]):
            for i in range(0, h.shape[1], c):
                rows = slice(i, i + c)
                nll[e, rows], kl[e, rows] = values(hc[e, rows] @ wc.T, p_t[rows],
                                                   neg_entropy[rows], targets[rows], temperature)
        ctx.save_for_backward(h, p_t, weight, targets)
        ctx.temperature, ctx.dtype, ctx.compiled = temperature, dtype, compiled
        return nll, kl

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor, grad_kl: torch.Tensor):
        h, p_t, weight, targets = ctx.saved_tensors
        c = LinearCrossEntropy.CHUNK
        grad = _compiled(_distill_grad) if ctx.compiled else _distill_grad
        hc, wc = h.to(ctx.dtype), weight.to(ctx.dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for e in range(h.shape[0]):
            for i in range(0, h.shape[1], c):
                rows = slice(i, i + c)
                g = grad(hc[e, rows] @ wc.T, p_t[rows], targets[rows], grad_nll[e, rows],
                         grad_kl[e, rows], ctx.temperature)                      # (c, V) again
                grad_h[e, rows] = g @ wc                                         # (c, d)
                grad_w += (g.T @ hc[e, rows]).float()                            # (V, d)
        return grad_h, None, None, grad_w.to(weight.dtype), None, None, None, None


def linear_distilled_cross_entropy(h: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor],
                                   weight: torch.Tensor, targets: torch.Tensor,
                                   temperature: float = 1.0, compiled: bool = False
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (NLL, KL(p_teacher || p_student) * T^2), each (k, N), of k exits' student
    rows h (k, N, d) at the same positions, against targets (N,) and the teacher there at
    T (what ``teacher_distribution`` returns), through ``F.linear(., weight)``, never
    holding a student's (N, V) logits; products in autocast's dtype, as in
    ``linear_cross_entropy``."""
    dtype = _compute_dtype(h)
    p_t, neg_entropy = (x.detach() for x in teacher)
    with torch.autocast(h.device.type, enabled=False):
        return LinearDistilledCrossEntropy.apply(h, p_t, neg_entropy, weight, targets,
                                                 temperature, dtype, compiled)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
                         ) -> torch.Tensor:
    """Per-row NLL (N,) of ``F.linear(h, weight)`` against targets (N,), never holding the
    (N, V) logits; under autocast the products run in its dtype, as ``F.linear``'s would.
    Targets are class ids (no ignore_index)."""
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return LinearCrossEntropy.apply(h, weight, targets, dtype)
