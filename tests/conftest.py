"""Fixtures shared by several test modules (pytest finds them here; test modules do not import each other).
Their plain helpers live in support modules: tests/harness.py, tests/tiny_run.py, tests/drawings.py."""
import pytest

from hvd_megdet.data.synthetic import make_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A generated shapes dataset (16 training, 4 validation images), one per test module; the data of
    tests/tiny_run.py's runs. A module that needs another size defines its own `shapes`."""
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(str(root), num_train=16, num_val=4, seed=1)
    return root
