"""Distillation losses: cross-entropy on the answer plus a divergence to the teacher's cached top-k.

    python -c "import torch; from edgedistill.distill.losses import topk_divergence; t = torch.randn(4, 10).log_softmax(-1).topk(3); print(topk_divergence(torch.randn(4, 10), t.values, t.indices, 2.0, 'jsd'))"

The cache keeps, per position, the teacher's k most likely ids and their log-probs over the full
vocabulary at T=1. Teacher and student are both collapsed onto k+1 buckets: the k teacher ids and
one "everything else" bucket holding the rest of the mass. On those buckets the divergences are
exact, so a student equal to the teacher scores 0; re-normalizing the teacher over its top-k alone
would leave a floor of -log(top-k mass).

Temperature: softmax(z / T) needs every teacher logit, and the cache does not say how the tail mass
is spread, so the teacher's tempered top-k cannot be recomputed. Both sides are therefore tempered
on their buckets: the k+1 bucket log-probs at T=1 are divided by T and re-normalized, i.e. the tail
is tempered as if it were a single token. This is exact at T=1 and when k = V. For T != 1 it is the
same approximation on both sides, so for every T the loss is 0 exactly when the student's buckets
equal the teacher's (tempering the student over its full vocabulary against a lumped teacher tail
would move the minimum away from the teacher). For T > 1 the lumped tail is under-weighted, since
sum_j p_j^(1/T) >= (sum_j p_j)^(1/T). The T^2 factor keeps gradients comparable across T (Hinton
et al., 2015).

Divergences, p = teacher and q = student over the buckets, mean over rows, times T^2:
    forward_kl  KL(p || q), mass-covering: the classic KD loss.
    reverse_kl  KL(q || p), mode-seeking.
    jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q: the generalized
                JSD of GKD (Agarwal et al., 2024, arXiv:2306.13649) with P = teacher, the weights of
                TRL's generalized_jsd_loss for 0 < beta < 1. It tends to beta * forward KL as beta -> 0
                and (1 - beta) * reverse KL as beta -> 1 (it vanishes at both ends), so only
                0 < beta < 1 is accepted: pick forward_kl or reverse_kl for the ends.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# The cached float32 log-probs all carry the rounding of the teacher's log-normalizer (about eps),
# so a tail below eps is noise; a tail of 0 would make reverse KL and JSD infinite, and one rounded
# to e^-100 would drive a reverse-KL student's tail towards it.
TEACHER_LOG_TAIL_FLOOR = math.log(torch.finfo(torch.float32).eps)


def topk_bucket_logprobs(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                         teacher_topk_ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs [N, k+1] on the teacher's k ids plus the tail bucket, at T.

    student_logits [N, V]; teacher_topk_logprobs, teacher_topk_ids [N, k]. With k = V there is no
    tail and the buckets are the k ids alone.
    """
    logits = student_logits.float()
    ids = teacher_topk_ids.long()
    teacher = teacher_topk_logprobs.float()
    log_norm = logits.logsumexp(-1, keepdim=True)
    student = logits.gather(-1, ids) - log_norm
    if ids.shape[-1] < logits.shape[-1]:
        # Rounding can put the top-k sum at or above 1: clamp before log(1 - mass), then floor.
        topk_mass_log = teacher.logsumexp(-1, keepdim=True).clamp(max=0.0)
        teacher_tail = torch.log(-torch.expm1(topk_mass_log)).clamp(min=TEACHER_LOG_TAIL_FLOOR)
        # Log-sum-exp over the complement itself rather than log(1 - top-k mass): the subtraction
        # cancels when the student's tail is tiny and its gradient scales as 1 / tail. The fill is
        # finite so that the gradient stays defined even if no logit is left outside.
        outside = logits.scatter(-1, ids, torch.finfo(logits.dtype).min)
        student_tail = outside.logsumexp(-1, keepdim=True) - log_norm
        teacher = torch.cat([teacher, teacher_tail], -1)
        student = torch.cat([student, student_tail], -1)
    return (teacher / temperature).log_softmax(-1), (student / temperature).log_softmax(-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probs (all finite here, so no 0 * inf terms)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _check(divergence: str, jsd_beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: expected one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta {jsd_beta!r}: expected 0 < jsd_beta < 1 "
                         "(the generalized JSD vanishes at 0 and 1; use forward_kl or reverse_kl)")


def topk_divergence(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                    teacher_topk_ids: torch.Tensor, temperature: float, divergence: str = "forward_kl",
                    jsd_beta: float = 0.5) -> torch.Tensor:
    """Mean over rows of T^2 * divergence(teacher_T, student_T) on the k+1 buckets (module docstring).

    student_logits [N, V]; teacher_topk_logprobs, teacher_topk_ids [N, k]; divergence one of
    DIVERGENCES; jsd_beta the teacher's weight in the JSD mixture.
    """
    _check(divergence, jsd_beta)
    teacher, student = topk_bucket_logprobs(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature)
    if divergence == "forward_kl":
        per_row = _kl(teacher, student)
    elif divergence == "reverse_kl":
        per_row = _kl(student, teacher)
    else:
        mixture = torch.logaddexp(teacher + math.log(jsd_beta), student + math.log1p(-jsd_beta))
        per_row = jsd_beta * _kl(teacher, mixture) + (1 - jsd_beta) * _kl(student, mixture)
    return per_row.mean() * temperature**2


def distill_loss(student_logits: torch.Tensor, is_answer: torch.Tensor, target_ids: torch.Tensor,
                 teacher_topk_logprobs: torch.Tensor, teacher_topk_ids: torch.Tensor, *,
                 kl_weight: float, temperature: float, divergence: str = "forward_kl",
                 jsd_beta: float = 0.5, scales: tuple[float, float] = (1.0, 1.0)) -> dict[str, torch.Tensor]:
    """(1 - kl_weight) * CE on the answer rows + kl_weight * divergence on all rows.

    student_logits [N, V] and the teacher's top-k [N, k] are rows of the same positions;
    is_answer [N] marks the rows that predict an answer token, target_ids [answer rows] their tokens.
    Returns loss, ce and kl (detached); kl holds the chosen divergence, whichever it is. `scales`
    multiply the CE and divergence terms of `loss` only: a data-parallel worker holding part of a
    batch weights its means by its share of the batch's rows.
    """
    _check(divergence, jsd_beta)
    ce = F.cross_entropy(student_logits[is_answer].float(), target_ids.long())
    if teacher_topk_ids.shape[-1] == 0:
        # No soft labels (response distillation for a student with another tokenizer).
        kl = student_logits.new_zeros(())
    else:
        kl = topk_divergence(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature, divergence,
                             jsd_beta)
    ce_scale, kl_scale = scales
    loss = (1 - kl_weight) * ce * ce_scale + kl_weight * kl * kl_scale
    return {"loss": loss, "ce": ce.detach(), "kl": kl.detach()}
