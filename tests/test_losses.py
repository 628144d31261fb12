"""Distillation losses against direct computations on small full and hand-bucketed distributions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgedistill.distill.losses import DIVERGENCES, distill_loss, topk_divergence

pytestmark = pytest.mark.unit


def _direct(p: torch.Tensor, q: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """The divergence per row of probability vectors p (teacher) and q (student), by definition."""
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _buckets(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """softmax(logits) collapsed by hand onto the ids plus one bucket for the rest."""
    probs = torch.softmax(logits.double(), -1)
    topk = probs.gather(-1, ids)
    return torch.cat([topk, 1 - topk.sum(-1, keepdim=True)], -1)


def _teacher_topk(teacher_logits: torch.Tensor, k: int):
    values, ids = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    return values, ids


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_with_the_whole_vocabulary_it_is_the_full_divergence_at_every_temperature(divergence):
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11) * 3
    values, ids = _teacher_topk(teacher, 11)
    for temperature in (0.5, 1.0, 2.0, 4.0):
        p, q = torch.softmax(teacher / temperature, -1), torch.softmax(student / temperature, -1)
        expected = _direct(p, q, divergence, 0.3).mean() * temperature**2
        got = topk_divergence(student, values, ids, temperature, divergence, jsd_beta=0.3)
        assert torch.allclose(got, expected, atol=1e-5), (temperature, got, expected)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_a_topk_it_is_the_divergence_of_the_hand_built_buckets(divergence, temperature):
    # At T != 1 the buckets are tempered as k+1 categories (the documented approximation).
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 40), torch.randn(6, 40) * 2
    values, ids = _teacher_topk(teacher, 7)
    p = torch.softmax(_buckets(teacher, ids).log() / temperature, -1)
    q = torch.softmax(_buckets(student, ids).log() / temperature, -1)
    expected = _direct(p, q, divergence, 0.7).mean() * temperature**2
    got = topk_divergence(student, values, ids, temperature, divergence, jsd_beta=0.7)
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_student_equal_to_the_teacher_scores_zero_despite_the_truncation(divergence, temperature):
    torch.manual_seed(2)
    teacher = torch.randn(4, 50)
    values, ids = _teacher_topk(teacher, 6)
    assert torch.logsumexp(values, -1).max() < -0.1  # a real tail, which a truncated KL cannot match
    assert abs(topk_divergence(teacher, values, ids, temperature, divergence).item()) < 1e-5
    assert topk_divergence(torch.randn(4, 50), values, ids, temperature, divergence) > 1e-2


def test_jsd_follows_the_gkd_convention_beta_weighs_the_teacher():
    # beta -> 0: JSD ~ beta * KL(p || q); beta -> 1: JSD ~ (1 - beta) * KL(q || p) (GKD, P = teacher).
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 30), torch.randn(5, 30) * 2
    values, ids = _teacher_topk(teacher, 8)
    forward = topk_divergence(student, values, ids, 1.0, "forward_kl")
    reverse = topk_divergence(student, values, ids, 1.0, "reverse_kl")
    beta = 1e-3
    assert torch.allclose(topk_divergence(student, values, ids, 1.0, "jsd", beta) / beta, forward, rtol=2e-2)
    assert torch.allclose(topk_divergence(student, values, ids, 1.0, "jsd", 1 - beta) / beta, reverse, rtol=2e-2)


def _assert_finite_gradients(student_logits, values, ids):
    for divergence in DIVERGENCES:
        for temperature in (0.5, 1.0, 2.0):
            logits = student_logits.clone().requires_grad_(True)
            loss = topk_divergence(logits, values, ids, temperature, divergence)
            loss.backward()
            assert torch.isfinite(loss), (divergence, temperature)
            assert torch.isfinite(logits.grad).all(), (divergence, temperature)


def test_gradients_are_finite_when_the_teachers_tail_is_zero():
    torch.manual_seed(4)
    teacher = torch.randn(4, 30)
    teacher[:, 0] = 80.0  # top-k mass rounds to 1 in float32: the tail would be log(0)
    values, ids = _teacher_topk(teacher, 5)
    assert (torch.logsumexp(values, -1) >= 0).all()
    _assert_finite_gradients(torch.randn(4, 30), values, ids)
    _assert_finite_gradients(teacher, values, ids)


def test_gradients_are_finite_when_the_students_probs_underflow():
    torch.manual_seed(5)
    values, ids = _teacher_topk(torch.randn(4, 30), 5)
    student = torch.randn(4, 30) * 1e3  # most probs, the tail included, are exactly 0 in float32
    student.scatter_(-1, ids[:, :1], -1e4)
    assert (torch.softmax(student, -1) == 0).float().mean() > 0.5
    _assert_finite_gradients(student, values, ids)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_the_gradient_pulls_the_student_onto_the_teacher(divergence):
    torch.manual_seed(6)
    teacher = torch.randn(3, 9) * 2
    values, ids = _teacher_topk(teacher, 4)
    student = torch.zeros(3, 9, requires_grad=True)
    optimizer = torch.optim.Adam([student], lr=0.2)
    start = topk_divergence(student, values, ids, 1.0, divergence).item()
    for _ in range(100):
        optimizer.zero_grad()
        topk_divergence(student, values, ids, 1.0, divergence).backward()
        optimizer.step()
    assert topk_divergence(student, values, ids, 1.0, divergence).item() < 1e-2 * start
    assert (student.argmax(-1) == teacher.argmax(-1)).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distill_loss_mixes_answer_ce_and_the_divergence_on_all_rows(divergence):
    torch.manual_seed(7)
    logits, teacher = torch.randn(6, 10), torch.randn(6, 10)
    values, ids = _teacher_topk(teacher, 4)
    is_answer = torch.tensor([False, False, False, True, True, True])
    targets = torch.tensor([1, 2, 3])
    out = distill_loss(logits, is_answer, targets, values, ids, kl_weight=0.25, temperature=2.0,
                       divergence=divergence, jsd_beta=0.4)
    ce = F.cross_entropy(logits[3:], targets)
    divergence_value = topk_divergence(logits, values, ids, 2.0, divergence, 0.4)
    assert torch.allclose(out["ce"], ce, atol=1e-6)
    assert torch.allclose(out["kl"], divergence_value, atol=1e-6)
    assert torch.allclose(out["loss"], 0.75 * ce + 0.25 * divergence_value, atol=1e-6)


def test_distill_loss_defaults_to_forward_kl_as_train_calls_it():
    torch.manual_seed(8)
    logits, teacher = torch.randn(4, 10), torch.randn(4, 10)
    values, ids = _teacher_topk(teacher, 10)
    out = distill_loss(logits, torch.tensor([False, True, False, True]), torch.tensor([0, 5]), values, ids,
                       kl_weight=0.5, temperature=2.0)
    p, q = torch.softmax(teacher / 2, -1), torch.softmax(logits / 2, -1)
    assert torch.allclose(out["kl"], _direct(p, q, "forward_kl").mean() * 4, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [({"divergence": "kl"}, "divergence 'kl'"),
                                               ({"divergence": "jsd", "jsd_beta": 0.0}, "jsd_beta 0.0"),
                                               ({"divergence": "jsd", "jsd_beta": 1.0}, "jsd_beta 1.0")])
def test_bad_divergence_settings_raise(kwargs, message):
    values, ids = _teacher_topk(torch.randn(2, 5), 3)
    with pytest.raises(ValueError, match=message):
        distill_loss(torch.randn(2, 5), torch.tensor([True, False]), torch.tensor([1]), values, ids,
                     kl_weight=0.5, temperature=1.0, **kwargs)
