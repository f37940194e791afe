"""The Distiller: parameters it trains, the frozen teacher, hooks, warm-up and bad input."""

import gc

import pytest
import torch

from ReCoKDLib import ReCoKDError
from ReCoKDLib.distill import Distiller, linear_warmup
from ReCoKDLib.models import build_pair, dynunet_tap_names, isotropic_spec

SPEC = isotropic_spec(1, 3, num_levels=4, filters=[16, 32, 64, 64])


def _batch(seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 1, size, size, size, generator=g)
    labels = torch.randint(0, 3, (2, 1, size, size, size), generator=g)
    return images, labels


def _distiller(method="recokd", **kw):
    torch.manual_seed(0)
    teacher, student = build_pair(SPEC, 4)
    taps = dynunet_tap_names(SPEC)
    return Distiller(teacher, student, taps, taps, num_classes=3, method=method, warmup_fraction=0, **kw)


@pytest.mark.parametrize("method", ["recokd", "recokd-gc", "fitnet", "cwd", "logit"])
def test_every_trainable_parameter_changes_and_teacher_never_does(method):
    d = _distiller(method).train()
    params = d.trainable_parameters()
    names = {id(p): n for n, p in d.named_parameters()}
    assert any("adapters" in names[id(p)] for p in params) == (method not in ("logit",))
    teacher_before = [p.detach().clone() for p in d.teacher.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.0, weight_decay=0.0)
    # The global-context block's last conv starts at zero, so its earlier layers get gradient from step 2.
    for step in range(2 if method == "recokd-gc" else 1):
        out = d(*_batch(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    unchanged = [names[id(p)] for p, b in zip(params, before) if torch.equal(p.detach(), b)]
    assert not unchanged, unchanged
    assert all(torch.equal(p, b) for p, b in zip(d.teacher.parameters(), teacher_before))
    assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training and d.student.training
    assert set(out.breakdown()) >= {"seg", "lambda", "total"}


def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:
            pass
    return total


def test_hooks_leave_no_residue_and_memory_stays_flat():
    d = _distiller().train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    usage = []
    for step in range(8):
        out = d(*_batch(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        del out
        assert not d.teacher_taps._store and not d.student_taps._store
        usage.append(_live_tensor_bytes())
    # After the optimizer state exists (step 1), live tensor memory must not grow.
    assert max(usage[2:]) <= usage[2] * 1.01, usage
    d.close()
    for net in (d.teacher, d.student):
        assert all(not m._forward_hooks for m in net.modules())


def test_warmup_schedule():
    assert linear_warmup(0.0, 2.0, 0.6) == 0.0
    assert linear_warmup(0.3, 2.0, 0.6) == pytest.approx(1.0)
    assert linear_warmup(0.9, 2.0, 0.6) == 2.0
    d = _distiller(lambda_max=0.5)
    d.warmup_fraction = 0.5
    assert d(*_batch()).kd_weight == 0.5 and d(*_batch(), progress=0.25).kd_weight == pytest.approx(0.25)


def test_method_none_trains_student_without_teacher_terms():
    d = _distiller("none")
    out = d(*_batch())
    assert set(out.terms) == {"seg"} and len(d.adapters) == 0


def test_bad_input_gives_one_line_errors():
    teacher, student = build_pair(SPEC, 4)
    enc = dynunet_tap_names(SPEC)
    with pytest.raises(ReCoKDError, match="different resolutions"):
        Distiller(teacher, student, enc, list(reversed(enc)), num_classes=3)
    with pytest.raises(ReCoKDError, match="'downsamples.7' is not a module"):
        Distiller(teacher, student, enc, enc[:-1] + ["downsamples.7"], num_classes=3)
    with pytest.raises(ReCoKDError, match="teacher taps but"):
        Distiller(teacher, student, enc, enc[:-1], num_classes=3)
    with pytest.raises(ReCoKDError, match="unknown KD method"):
        Distiller(teacher, student, enc, enc, num_classes=3, method="magic")
    d = Distiller(teacher, student, enc, enc, num_classes=3)
    images, labels = _batch()
    with pytest.raises(ReCoKDError, match="value 5, outside 0..2"):
        d(images, labels.clamp(max=0) + 5)
    with pytest.raises(ReCoKDError, match="5D"):
        d(images[0], labels)
    with pytest.raises(ReCoKDError, match="5D"):
        d(images, labels[:, 0])


def test_term_gradients_split_levels_and_match_the_training_loss():
    from ReCoKDLib.distill.diagnostics import term_gradients

    d = _distiller("recokd").train()
    images, labels = _batch(3)
    saved = [list(t.level_weights) for t in d.kd_terms.values()]
    rows = term_gradients(d, images, labels)
    assert [list(t.level_weights) for t in d.kd_terms.values()] == saved  # restored
    assert rows[0].term == "seg" and rows[0].level is None
    levels = len(dynunet_tap_names(SPEC))
    for key in ("msard_fg", "msard_bg", "msard_att", "msca"):
        per_level = [r for r in rows if r.term == key and r.level is not None]
        total = next(r for r in rows if r.term == key and r.level is None)
        assert [r.level for r in per_level] == list(range(levels))
        assert sum(r.loss for r in per_level) == pytest.approx(total.loss, rel=1e-5)  # linear in level weights
        assert all(r.grad_norm > 0 for r in per_level)

    # the summed rows are the norms of the gradients the training step back-propagates
    out = d(images, labels)
    params = list(d.student.parameters())
    for key in ("seg", "msard_fg", "msca"):
        grads = torch.autograd.grad(out.terms[key], params, retain_graph=True, allow_unused=True)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))
        assert next(r for r in rows if r.term == key and r.level is None).grad_norm == pytest.approx(norm, rel=1e-4)


@pytest.mark.parametrize("method", ["recokd", "recokd-gc", "cwd", "logit"])
def test_kd_terms_run_in_fp32_under_autocast_and_match_the_fp32_step(method):
    """Under CPU bf16 autocast (the networks in bf16) every KD term comes out float32 and close to the fp32
    step's value: the terms are computed in fp32 whatever the networks ran in."""
    images, labels = _batch()
    d = _distiller(method)
    reference = {k: float(v) for k, v in d(images, labels).terms.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(images, labels)
    for name, value in out.terms.items():
        if name == "seg":
            continue
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        assert float(value) == pytest.approx(reference[name], rel=0.1, abs=1e-3), name


def test_kd_terms_survive_half_precision_features_near_the_fp16_limit(monkeypatch):
    """Features handed over in float16 at magnitudes whose squares exceed fp16's range (65504): the terms stay
    finite because they are computed in fp32."""
    from ReCoKDLib.models.taps import FeatureTaps

    real = FeatureTaps.features
    monkeypatch.setattr(FeatureTaps, "features", lambda self: [(f * 1e3).clamp(-6e4, 6e4).half() for f in real(self)])
    images, labels = _batch()
    out = _distiller("recokd")(images, labels)
    assert all(torch.isfinite(v) for v in out.terms.values()), {k: float(v) for k, v in out.terms.items()}
    assert out.terms["msard_fg"] > 1e3  # the magnitudes did arrive (an error of order 1e6 per voxel)


def _count_device_reads(monkeypatch) -> list[str]:
    """Record every call that makes the host wait for a tensor's value (on a GPU, a synchronisation).

    One read is not counted: MONAI's Dice loss lists ``torch.arange(2, ndim)``, a tensor it makes on the CPU
    from a shape (no GPU work to wait for)."""
    import traceback

    reads: list[str] = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            caller = traceback.extract_stack(limit=2)[0]
            if not (caller.filename.endswith("monai/losses/dice.py") and "torch.arange" in (caller.line or "")):
                reads.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("special", ["none", "teacher", "ignore", "both"])
def test_a_distillation_step_reads_the_device_once(monkeypatch, special):
    """Issue 33: the label check, whether teacher-labelled or left-out voxels exist, and the masked loss's
    "any voxel kept?" are read in one synchronisation per step, not one each."""
    from ReCoKDLib.utils.labels import IGNORE_LABEL, TEACHER_LABEL

    d = _distiller("recokd").train()
    images, labels = _batch()
    if special in ("teacher", "both"):
        labels[0, :, :8] = TEACHER_LABEL
    if special in ("ignore", "both"):
        labels[1, :, 8:] = IGNORE_LABEL
    reads = _count_device_reads(monkeypatch)
    out = d(images, labels)
    monkeypatch.undo()
    assert reads == ["tolist"], reads
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # checked on the host beforehand (as the training loop does): no read at all, the same loss
    found = d.check_labels(labels.to(torch.uint8))
    assert found == (special in ("teacher", "both"), special in ("ignore", "both"))
    reads = _count_device_reads(monkeypatch)
    again = d(images, labels, checked=found)
    monkeypatch.undo()
    assert reads == [] and float(again.loss.detach()) == pytest.approx(float(out.loss.detach()), rel=1e-6)


@pytest.mark.parametrize("labels, error", [
    ([0, 1, 2], None), ([0, 254, 255], None), ([254], None), ([255, 1], None), ([0, 3], "the value 3, outside 0..2"),
    ([7, 254], "the value 7, outside 0..2"), ([253], "the value 253, outside 0..2")])
def test_the_hosts_label_count_agrees_with_the_devices_check(labels, error):
    """A loader's uint8 batch is checked by counting its values (bincount), anything else in one device read:
    the same findings and the same one-line error either way."""
    from ReCoKDLib.losses.checks import require_labels

    batch = torch.tensor(labels * 10, dtype=torch.uint8)[: 8 * len(labels)].reshape(1, 1, len(labels), 2, 4)
    results = []
    for tensor in (batch, batch.long()):
        try:
            results.append(require_labels(tensor, 3, special=True))
        except ReCoKDError as exc:
            results.append(str(exc))
    assert results[0] == results[1]
    with pytest.raises(ReCoKDError, match="the value 300, outside 0..2"):  # int16 labels may exceed the special values
        require_labels(torch.tensor([0, 300, 254]).reshape(1, 1, 3, 1, 1).short(), 3, special=True)
    if error:
        assert error in results[0]
    else:
        assert results[0] == (254 in labels, 255 in labels)


def test_the_masked_loss_of_a_patch_with_nothing_kept_is_zero_not_nan():
    from ReCoKDLib.losses.segmentation import DeepSupervisedDiceCELoss
    from ReCoKDLib.utils.labels import IGNORE_LABEL

    logits = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    labels = torch.full((1, 1, 8, 8, 8), IGNORE_LABEL)
    loss = DeepSupervisedDiceCELoss()(logits, labels, ignore=True)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
