"""Fixtures of the multi-process tests: one set of synthetic training shards per session."""

import pytest

from train_helpers import make_shards


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("train_data"))
