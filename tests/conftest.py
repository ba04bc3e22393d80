import pytest

from tests.tiny_models import CONFIGS, save_tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Every tiny model, saved once per test session: name -> checkpoint folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_tiny_model(name, root / name) for name in CONFIGS}


def pytest_configure(config):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
