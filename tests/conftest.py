import json
import os

import pyarrow.parquet as pq
import pytest

from tests.tiny_models import FAMILY_CONFIGS, save_tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Every tiny model, saved once per test session: name -> checkpoint folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_tiny_model(name, root / name) for name in FAMILY_CONFIGS}


def pytest_configure(config):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (num_cpus=2), shut down at the end."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync in the test, as (path, a complete file (a Parquet file with rows, or a
    JSON document)?, its published name (the path without the leading "." and trailing
    ".tmp") already there?)."""
    seen, real_fsync = [], os.fsync

    def spy(descriptor):
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        final = os.path.join(os.path.dirname(path), os.path.basename(path)[1:].removesuffix(".tmp"))
        whole = pq.ParquetFile(path).metadata.num_rows > 0 if final.endswith(".parquet") else _is_json(path)
        seen.append((path, whole, os.path.exists(final)))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _is_json(path: str) -> bool:
    try:
        with open(path) as f:
            json.load(f)
        return True
    except ValueError:
        return False
