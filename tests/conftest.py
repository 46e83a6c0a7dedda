import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest

from lorafind_utils.core.config import load_profile


def tiny_overrides(root):
    return {
        "models": {"base": str(root / "models" / "sd15"), "controlnet": str(root / "models" / "controlnet-canny")},
        "lora_dir": str(root / "loras"),
        "runs_dir": str(root / "runs"),
        "figures_dir": str(root / "figures"),
    }


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_cfg(tiny_root):
    return load_profile("standin", tiny_overrides(tiny_root))


@pytest.fixture(scope="session")
def catalog(tiny_cfg):
    from lorafind_utils.models.pipelines import prepare_loras

    return prepare_loras(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_cfg, catalog):
    from lorafind_utils.models.pipelines import load_pipeline

    return load_pipeline(tiny_cfg, "cpu")


@pytest.fixture(scope="session")
def stage_params(tiny_cfg):
    from lorafind_utils.core.config import stage_params

    return stage_params(tiny_cfg, "01_synthesize")
