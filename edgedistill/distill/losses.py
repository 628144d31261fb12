"""Distillation losses: cross-entropy on the teacher's answer and a KL term on its top-k log-probs.

    python -c "import torch; from edgedistill.distill.losses import topk_forward_kl; print(topk_forward_kl(torch.randn(4, 10), torch.randn(4, 3).log_softmax(-1), torch.randint(0, 10, (4, 3)), 2.0))"

The KL term compares teacher and student next-token distributions at a temperature T over the
teacher's top-k tokens: the cached teacher log-probs are re-normalized over the top-k at T, the
student's full-vocabulary log-probs at T are gathered at the same ids. Multiplying by T^2 keeps
the gradient scale comparable across temperatures (Hinton et al., 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_forward_kl(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                    teacher_topk_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of T^2 * KL(teacher_T || student_T) restricted to the teacher's top-k ids.

    student_logits [N, V]; teacher_topk_logprobs, teacher_topk_ids [N, k].
    """
    teacher = torch.log_softmax(teacher_topk_logprobs.float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_topk_ids.long())
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return kl.mean() * temperature**2


def distill_loss(student_logits: torch.Tensor, is_answer: torch.Tensor, target_ids: torch.Tensor,
                 teacher_topk_logprobs: torch.Tensor, teacher_topk_ids: torch.Tensor, *,
                 kl_weight: float, temperature: float) -> dict[str, torch.Tensor]:
    """(1 - kl_weight) * CE on the answer rows + kl_weight * KL on all rows.

    student_logits [N, V] and the teacher's top-k [N, k] are rows of the same positions;
    is_answer [N] marks the rows that predict an answer token, target_ids [answer rows] their tokens.
    """
    ce = F.cross_entropy(student_logits[is_answer].float(), target_ids.long())
    kl = topk_forward_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature)
    return {"loss": (1 - kl_weight) * ce + kl_weight * kl, "ce": ce.detach(), "kl": kl.detach()}
