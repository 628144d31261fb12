"""Distillation losses against direct full-vocabulary computations on small tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgedistill.distill.losses import distill_loss, topk_forward_kl


def _full_kl(student_logits, teacher_logits, temperature):
    p = torch.softmax(teacher_logits / temperature, -1)
    return (p * (p.log() - torch.log_softmax(student_logits / temperature, -1))).sum(-1).mean() * temperature**2


def test_topk_kl_with_the_whole_vocabulary_is_the_full_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11) * 3
    values, ids = torch.log_softmax(teacher, -1).topk(11, dim=-1)
    for temperature in (0.5, 1.0, 2.0, 4.0):
        assert torch.allclose(topk_forward_kl(student, values, ids, temperature),
                              _full_kl(student, teacher, temperature), atol=1e-5)


def test_topk_kl_of_a_perfect_copy_is_the_teachers_mass_outside_the_topk():
    # The teacher is re-normalized over its top-k, the student is not: a student equal to the
    # teacher scores -log(top-k mass), the floor this truncated KL can reach (issue 3 handles the
    # tail mass explicitly).
    torch.manual_seed(1)
    teacher = torch.randn(4, 20)
    values, ids = torch.log_softmax(teacher, -1).topk(6, dim=-1)
    expected = -torch.logsumexp(values, -1).mean()
    assert torch.allclose(topk_forward_kl(teacher, values, ids, 1.0), expected, atol=1e-5)
    assert topk_forward_kl(torch.randn(4, 20), values, ids, 1.0) > expected


def test_topk_kl_gradient_pulls_student_towards_teacher():
    torch.manual_seed(2)
    teacher = torch.randn(3, 9) * 2
    values, ids = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    student = torch.zeros(3, 9, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=1.0)
    start = topk_forward_kl(student, values, ids, 1.0).item()
    for _ in range(50):
        optimizer.zero_grad()
        topk_forward_kl(student, values, ids, 1.0).backward()
        optimizer.step()
    assert topk_forward_kl(student, values, ids, 1.0).item() < 0.2 * start
    assert (student.argmax(-1) == teacher.argmax(-1)).all()


def test_distill_loss_mixes_answer_ce_and_kl_on_all_rows():
    torch.manual_seed(3)
    logits, teacher = torch.randn(6, 10), torch.randn(6, 10)
    values, ids = torch.log_softmax(teacher, -1).topk(10, dim=-1)
    is_answer = torch.tensor([False, False, False, True, True, True])
    targets = torch.tensor([1, 2, 3])
    out = distill_loss(logits, is_answer, targets, values, ids, kl_weight=0.25, temperature=2.0)
    ce = F.cross_entropy(logits[3:], targets)
    kl = _full_kl(logits, teacher, 2.0)
    assert torch.allclose(out["ce"], ce, atol=1e-6)
    assert torch.allclose(out["kl"], kl, atol=1e-5)
    assert torch.allclose(out["loss"], 0.75 * ce + 0.25 * kl, atol=1e-5)
