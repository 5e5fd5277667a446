"""hvd_megdet.categories: comparing an annotation file's categories with a model's (model_categories, the
checkpoint's list or its fallback, is tested through the commands: tests/test_predict.py, test_evaluate.py)."""
from hvd_megdet.categories import differences

MODEL = [{"id": 1, "name": "disc"}, {"id": 3, "name": "rectangle"}, {"id": 7, "name": "triangle"}]


def test_the_same_categories_in_another_order_do_not_differ():
    assert differences(MODEL, MODEL[::-1]) == ""


def test_renumbered_missing_and_extra_categories_are_named_by_id():
    other = [{"id": 1, "name": "rectangle"}, {"id": 3, "name": "disc"}, {"id": 9, "name": "cross"}]
    assert differences(MODEL, other) == ("id 1: 'rectangle' vs 'disc', id 3: 'disc' vs 'rectangle', "
                                         "id 7: absent vs 'triangle', id 9: 'cross' vs absent")
