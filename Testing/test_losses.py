"""The ReCo-KD terms and the baselines: values, gradients, masks, memory bounds and bad input."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ReCoKDLib import ReCoKDError
from ReCoKDLib.losses import (
    AffinityContextLoss,
    ChannelWiseDistillationLoss,
    FitNetLoss,
    GlobalContextLoss,
    KD_METHODS,
    KDContext,
    LogitKDLoss,
    MSSARDLoss,
    affinity,
    affinity_mse,
    PairwiseAffinityLoss,
    build_kd_terms,
    level_weights,
    pooled_grid,
    region_masks,
    region_terms,
)

torch.manual_seed(0)


def _labels(shape=(2, 1, 8, 8, 8), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, shape, generator=g)


def _pair(shape=(2, 6, 8, 8, 8)):
    teacher = torch.randn(shape, requires_grad=True)  # requires_grad so a leak of gradient would show
    student = torch.randn(shape, requires_grad=True)
    return student, teacher


def _levels():
    shapes = [(2, 6, 8, 8, 8), (2, 10, 4, 4, 4)]
    teacher = [torch.randn(s, requires_grad=True) for s in shapes]
    student = [torch.randn(s, requires_grad=True) for s in shapes]
    return student, teacher


def _all_feature_losses():
    w = level_weights(2)
    return {
        "msard": MSSARDLoss(3, w),
        "msca": AffinityContextLoss(w, max_positions=64),
        "msca_gc": GlobalContextLoss([6, 10], w),
        "fitnet": FitNetLoss(w),
        "cwd": ChannelWiseDistillationLoss(w),
        "skd": PairwiseAffinityLoss(max_positions=64),
    }


def test_region_terms_zero_when_equal_positive_otherwise_and_student_only_gradient():
    student, teacher = _pair()
    labels = _labels()
    same = region_terms(teacher.detach().clone(), teacher, labels, num_classes=3)
    assert set(same) == {"foreground", "background", "attention"}
    assert all(float(v) == 0.0 for v in same.values())
    diff = region_terms(student, teacher, labels, num_classes=3)
    assert all(float(v.detach()) > 0 for v in diff.values())
    sum(diff.values()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("name", list(_all_feature_losses()))
def test_feature_losses_zero_when_equal_positive_otherwise(name):
    loss = _all_feature_losses()[name]
    student, teacher = _levels()
    labels = _labels()
    same = loss([t.detach().clone() for t in teacher], teacher, labels)
    assert all(abs(float(v)) < 1e-6 for v in same.values()), same
    out = loss(student, teacher, labels)
    total = sum(out.values())
    assert float(total.detach()) > 0
    total.backward()
    assert student[0].grad is not None and student[0].grad.abs().sum() > 0
    assert all(t.grad is None for t in teacher)


def test_logit_kd_zero_when_equal_positive_otherwise():
    loss = LogitKDLoss(temperature=2.0)
    s, t = _pair((2, 3, 4, 4, 4))
    assert abs(float(loss(t.detach().clone(), t)["logit_kd"])) < 1e-6
    value = loss(s, t)["logit_kd"]
    assert float(value) > 0
    value.backward()
    assert s.grad is not None and t.grad is None


def test_scale_normalisation_gives_each_structure_equal_weight():
    labels = torch.zeros(1, 1, 40, 40, 40, dtype=torch.long)
    labels[0, 0, :20, :20, :50] = 1  # 20 x 20 x 40 = 16000 voxels... made exact below
    labels.zero_()
    flat = labels.view(-1)
    flat[:20000] = 1  # a 20 000-voxel structure
    flat[30000:30020] = 2  # a 20-voxel lesion
    m_fg, m_bg = region_masks(labels, num_classes=3)
    ids = labels.view(1, -1)
    assert torch.isclose(m_fg[ids == 1].sum(), torch.tensor(1.0))
    assert torch.isclose(m_fg[ids == 2].sum(), torch.tensor(1.0))
    assert torch.isclose(m_bg.sum(), torch.tensor(1.0))
    assert float(m_fg[ids == 0].abs().sum()) == 0 and float(m_bg[ids != 0].abs().sum()) == 0


def test_absent_classes_contribute_nothing_and_give_no_nan():
    student, teacher = _pair((2, 4, 6, 6, 6))
    labels = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    labels[0, 0, :2, :2, :2] = 1  # sample 1 has no foreground; class 2 absent everywhere
    m_fg, _ = region_masks(labels, num_classes=3)
    assert float(m_fg[1].sum()) == 0 and torch.isclose(m_fg[0].sum(), torch.tensor(1.0))
    terms = region_terms(student, teacher, labels, num_classes=3)
    assert all(torch.isfinite(v) for v in terms.values())
    empty = region_terms(student, teacher, torch.zeros_like(labels), num_classes=3)
    assert float(empty["foreground"]) == 0.0 and torch.isfinite(empty["background"])
    sum(empty.values()).backward()
    assert torch.isfinite(student.grad).all()


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any op allocates (views and in-place ops,
    whose outputs alias an input, allocate nothing and are skipped)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_msca_memory_is_bounded_at_128_cubed():
    budget = 16**3
    b = 2
    # Encoder levels of a 128^3 patch; meta tensors: shapes are computed, nothing is allocated, so an
    # N x N implementation would show up here instead of exhausting memory.
    shapes = [(b, 32, 128, 128, 128), (b, 64, 64, 64, 64), (b, 128, 32, 32, 32), (b, 256, 16, 16, 16)]
    student = [torch.randn(s, device="meta") for s in shapes]
    teacher = [torch.randn(s, device="meta") for s in shapes]
    loss = AffinityContextLoss(level_weights(len(shapes)), max_positions=budget)
    with _LargestOutput() as probe:
        loss(student, teacher)
    assert probe.largest <= b * budget * budget
    # Gram-matrix evaluation: nothing P x P is built at all; the largest tensor is the pooled features.
    assert probe.largest <= b * 256 * budget
    for s in shapes:
        assert math.prod(pooled_grid(s[2:], budget)) <= budget
    assert pooled_grid((100, 70, 44), budget) == pooled_grid((100, 70, 44), budget)  # deterministic
    assert pooled_grid((8, 8, 8), budget) == (8, 8, 8)  # within budget: no pooling


def test_affinity_mse_equals_explicit_affinity_difference():
    student, teacher = torch.randn(2, 5, 12, 10, 9), torch.randn(2, 7, 12, 10, 9)
    for budget in (64, 10_000):
        explicit = (affinity(student, budget) - affinity(teacher, budget)).pow(2).mean()
        assert torch.allclose(affinity_mse(student, teacher, budget), explicit, rtol=1e-4, atol=1e-7)
    assert float(affinity_mse(teacher, teacher.clone(), 64)) == 0.0


def test_msca_is_invariant_to_channel_count():
    student, teacher = _levels()
    loss = AffinityContextLoss(level_weights(2), max_positions=27)
    base = loss(student, teacher)["msca"]
    doubled = loss([torch.cat([s, s], dim=1) for s in student], teacher)["msca"]
    assert torch.allclose(base, doubled, atol=1e-6)


def test_level_weights_follow_method():
    w = level_weights(4, alpha=0.4)
    assert math.isclose(sum(w), 1.0)
    assert all(math.isclose(w[k + 1] / w[k], 2 ** (-1.2)) for k in range(3))


def test_bad_input_is_a_one_line_error():
    student, teacher = _pair()
    labels = _labels()
    with pytest.raises(ReCoKDError, match="5D"):
        region_terms(student[0], teacher[0], labels, 3)
    with pytest.raises(ReCoKDError, match="value 3, outside 0..2"):
        region_terms(student, teacher, labels + 1, 3)
    with pytest.raises(ReCoKDError, match="differ"):
        region_terms(student[:, :4], teacher, labels, 3)
    with pytest.raises(ReCoKDError, match="feature grid"):
        region_terms(student, teacher, labels[..., :4], 3)
    with pytest.raises(ReCoKDError, match="student feature levels"):
        MSSARDLoss(3, level_weights(2))([student], [teacher, teacher], labels)


def test_registry_builds_every_method_and_rejects_unknown():
    ctx = KDContext(num_classes=3, teacher_channels=(6, 10), student_channels=(2, 3), level_weights=(0.7, 0.3))
    for name, method in KD_METHODS.items():
        built = build_kd_terms(method.terms, ctx)
        assert list(built) == list(method.terms), name
    with pytest.raises(ReCoKDError, match="bad option"):
        build_kd_terms(["msard"], ctx, {"msard": {"temprature": 1.0}})
    with pytest.raises(ReCoKDError, match="not among the terms"):
        build_kd_terms(["msard"], ctx, {"cwd": {}})
