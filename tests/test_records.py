"""records.changes: what counts as a changed setting for the checkpoint config check, the critique
provenance check and the pipeline's saved-config check."""

from cloud_jax.records import changes, flatten


def test_flatten_names_leaves_by_dotted_keys():
    assert flatten({"model": {"hidden_size": 64, "rope": {"theta": 1e4}}, "seed": 0, "x": {}}) == {
        "model.hidden_size": 64, "model.rope.theta": 1e4, "seed": 0, "x": {}}


def test_changes_pairs_old_and_new_values_sorted_by_key():
    old = {"model": {"hidden_size": 64, "num_layers": 2}, "seed": 0, "gone": 1}
    new = {"model": {"hidden_size": 128, "num_layers": 2}, "seed": 1, "added": {"a": 1}}
    assert changes(old, new) == {"added.a": (None, 1), "gone": (1, None),
                                 "model.hidden_size": (64, 128), "seed": (0, 1)}
    assert changes(old, old) == {}


def test_ignore_names_keys_or_whole_sections():
    old = {"evaluation": {"seed": 0}, "evaluation_rows": 1, "seed": 0}
    new = {"evaluation": {"seed": 1}, "evaluation_rows": 2, "seed": 1}
    assert list(changes(old, new, ignore=("evaluation", "seed"))) == ["evaluation_rows"]
