"""LabelSet: the one label-set value that datasets, plans, bundles, metrics and Slicer share."""

from __future__ import annotations

import json
import pickle

import pytest

from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.utils.labels import DEFAULT_PALETTE, NAMED_COLORS, LabelSet


def test_both_dataset_json_layouts_give_the_same_set() -> None:
    nnunet = LabelSet.parse({"background": 0, "tumour": 2, "edema": 1}, "a.json")
    msd = LabelSet.parse({"0": "background", "1": "edema", "2": "tumour"}, "b.json")
    assert nnunet == msd == {"background": 0, "edema": 1, "tumour": 2}
    assert list(nnunet) == ["background", "edema", "tumour"]  # by value
    assert json.loads(json.dumps(nnunet.to_json())) == dict(nnunet)


def test_names_classes_and_ignore() -> None:
    labels = LabelSet({"background": 0, "a": 1, "c": 3, "ignore": 4})
    assert labels.num_classes == 4 and labels.ignore_label == 4
    assert labels.names == ["background", "a", "label_2", "c"] and labels.foreground_names == ["a", "label_2", "c"]
    assert labels.foreground() == [("a", 1), ("c", 3)]


@pytest.mark.parametrize("values, message", [
    ({"background": 0, "a": -1}, "negative"),
    ({"background": 0, "a": 1, "b": 1}, "more than one name"),
    ({"a": 1}, "background value 0"),
    ({"background": 0, "a": "x"}, "not an integer"),
    ({}, "non-empty"),
])
def test_bad_values_are_one_line_naming_the_source(values, message) -> None:
    with pytest.raises(ReCoKDError, match=message) as info:
        LabelSet(values, source="my/dataset.json")
    assert "my/dataset.json" in str(info.value) and "\n" not in str(info.value)


def test_colours_default_named_then_palette_and_given_ones_win() -> None:
    phantom = LabelSet({"background": 0, "organ": 1, "lesion": 4})
    assert phantom.colors["organ"] == NAMED_COLORS["organ"]
    other = LabelSet({"background": 0, "liver": 1, "spleen": 2}, colors={"spleen": [0.1, 0.2, 0.3]})
    assert other.colors == {"background": (0.0, 0.0, 0.0), "liver": DEFAULT_PALETTE[0], "spleen": (0.1, 0.2, 0.3)}
    with pytest.raises(ReCoKDError, match="0..1"):
        LabelSet({"background": 0, "a": 1}, colors={"a": [0, 0, 255]})
    with pytest.raises(ReCoKDError, match="do not exist"):
        LabelSet({"background": 0, "a": 1}, colors={"b": [0, 0, 1]})


def test_terminology_must_name_known_labels_and_display_json_carries_it() -> None:
    codes = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "82471001", "Left atrium"]}
    labels = LabelSet({"background": 0, "left_atrium": 1}, terminology={"left_atrium": codes})
    shown = labels.display_json()
    assert shown["labels"] == {"background": 0, "left_atrium": 1} and shown["terminology"] == {"left_atrium": codes}
    assert LabelSet(shown["labels"], shown["colors"], shown["terminology"]).display_json() == shown
    with pytest.raises(ReCoKDError, match="does not have"):
        labels.with_display(terminology={"right_atrium": codes})
    # equality is names and values only: a recoloured set is the same classes
    assert labels.with_display(colors={"left_atrium": [1, 0, 0]}) == labels


def test_pickles_for_preprocessing_workers() -> None:
    labels = LabelSet({"background": 0, "a": 1}, colors={"a": [1, 0, 0]})
    copy = pickle.loads(pickle.dumps(labels))
    assert copy == labels and copy.colors == labels.colors


def test_one_value_from_dataset_to_plan_to_bundle(tmp_path) -> None:
    """The dataset's label set travels unchanged through the fingerprint, the plan and a bundle."""
    from bundle_helpers import tiny_network
    from ReCoKDLib.data.datasets import open_dataset
    from ReCoKDLib.data.fingerprint import compute_fingerprint
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet
    from ReCoKDLib.data.planning import Plans, plan_experiment
    from ReCoKDLib.deployment.bundle import bundle_from_network, load_bundle

    dataset = open_dataset(save_dataset_nnunet(generate_dataset(2, seed=1, shape=(32, 32, 32)), tmp_path / "ds"))
    plans, _ = plan_experiment(compute_fingerprint(dataset, progress=False))
    plans.save(tmp_path / "plans.json")
    reloaded = Plans.load(tmp_path / "plans.json")
    assert isinstance(reloaded.labels, LabelSet) and reloaded.labels == dataset.labels
    bundle = bundle_from_network(tiny_network(reloaded), reloaded, "m")
    bundle.save(tmp_path / "m.recokd")
    loaded = load_bundle(tmp_path / "m.recokd")
    assert loaded.labels == dataset.labels and loaded.labels.colors == dataset.labels.colors
    assert loaded.labels.names == dataset.labels.names == ["background", "organ", "kidney", "vessel", "lesion"]
