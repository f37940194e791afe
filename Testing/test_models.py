"""Networks, matched pairs and feature taps."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from ReCoKDLib import ReCoKDError
from ReCoKDLib.models import FeatureTaps, UNetSpec, build_pair, build_unet, count_parameters, dynunet_tap_names, isotropic_spec


def test_student_width_rule_matches_method():
    spec = isotropic_spec(1, 3, num_levels=6)
    assert spec.filters == (32, 64, 128, 256, 320, 320)
    assert spec.student(4).filters == (8, 16, 32, 64, 80, 80)
    assert spec.student(8).filters == (8, 8, 16, 32, 40, 40)  # floor(c/R), never below 8
    assert spec.student(4).strides == spec.strides and spec.student(4).kernel_sizes == spec.kernel_sizes


def test_spec_json_round_trip_and_errors():
    spec = UNetSpec(2, 4, [(1, 3, 3), 3, 3, 3], [1, (1, 2, 2), 2, 2], [16, 32, 64, 128], name="t")
    again = UNetSpec.from_json(spec.to_json())
    assert again == spec and json.loads(spec.to_json())["kernel_sizes"][0] == [1, 3, 3]
    with pytest.raises(ReCoKDError, match="one entry per level"):
        UNetSpec(1, 2, [3, 3, 3], [1, 2, 2, 2], [8, 16, 32])
    with pytest.raises(ReCoKDError, match="lacks the key"):
        UNetSpec.from_dict({"in_channels": 1})
    # nnU-Net's decoder kernels survive the description (the default is left out: older ones read the same)
    assert "decoder_kernels" not in spec.to_dict() and UNetSpec.from_dict(spec.to_dict()).decoder_kernels == "deeper"
    own = UNetSpec.from_json(replace(spec, decoder_kernels="own").to_json())
    assert own.decoder_kernels == "own" and own.student(4).decoder_kernels == "own"
    shapes = [tuple(up.conv_block.conv1.conv.weight.shape[2:]) for up in build_unet(own).upsamples]
    assert shapes == [(3, 3, 3), (3, 3, 3), (1, 3, 3)]  # the level-0 stage convolves with level 0's kernel
    assert [tuple(up.conv_block.conv1.conv.weight.shape[2:]) for up in build_unet(spec).upsamples][-1] == (3, 3, 3)
    with pytest.raises(ReCoKDError, match="decoder_kernels must be one of deeper, own"):
        replace(spec, decoder_kernels="mine")


def test_pair_shapes_deep_supervision_and_parameter_ratio():
    spec = isotropic_spec(1, 5, num_levels=4, filters=[32, 64, 128, 256])
    teacher, student = build_pair(spec, 4)
    x = torch.randn(1, 1, 32, 32, 32)
    teacher.train()
    outs = teacher(x)
    assert isinstance(outs, list) and [tuple(o.shape[2:]) for o in outs] == [(32, 32, 32), (16, 16, 16)]
    student.eval()
    assert student(x).shape == (1, 5, 32, 32, 32)
    ratio = count_parameters(student) / count_parameters(teacher)
    assert 0.04 < ratio < 0.08, ratio  # ~1/16 at R = 4
    with pytest.raises(ReCoKDError, match="5D"):
        student(torch.randn(1, 32, 32, 32))


def test_dynunet_taps_have_expected_channels_and_strides():
    spec = isotropic_spec(1, 3, num_levels=4, filters=[16, 32, 64, 128])
    teacher, _ = build_pair(spec)
    with FeatureTaps(teacher, dynunet_tap_names(spec, "encoder")) as taps:
        info = taps.probe((1, 1, 32, 32, 32))
    assert [(i.channels, i.stride) for i in info] == [(16, (1, 1, 1)), (32, (2, 2, 2)), (64, (4, 4, 4))]
    with FeatureTaps(teacher, dynunet_tap_names(spec, "decoder")) as taps:
        info = taps.probe((1, 1, 32, 32, 32))
    assert [(i.channels, i.stride) for i in info] == [(16, (1, 1, 1)), (32, (2, 2, 2)), (64, (4, 4, 4))]


def test_taps_work_on_any_module_and_leave_no_hooks():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, stride=2, padding=1))
    taps = FeatureTaps(net, ["1", "2"])
    net(torch.randn(2, 1, 8, 8, 8))
    a, b = taps.features()
    assert a.shape == (2, 4, 8, 8, 8) and b.shape == (2, 6, 4, 4, 4)
    taps.close()
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ReCoKDError, match="did not run"):
        taps.features()


def test_unknown_tap_name_is_one_line_error():
    net = nn.Sequential(nn.Conv3d(1, 4, 3))
    with pytest.raises(ReCoKDError, match="'encoder.9' is not a module") as err:
        FeatureTaps(net, ["encoder.9"])
    assert "\n" not in str(err.value)
