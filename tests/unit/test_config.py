from pathlib import Path

import pytest
import yaml

from cot2align_ds.config import ConfigError, load_config, shipped_recipes, validate_config


def test_shipped_demo_recipe_loads():
    assert "demo" in shipped_recipes()
    config = load_config("demo")
    assert config.distill.method == "uld"
    assert config.student.architecture["model_type"] == "gpt2"


def test_overrides_apply_with_yaml_typed_values():
    config = load_config(
        "demo", ["train.lr=1e-4", "train.micro_batch_size=3", "tracking.tags=[a, b]"]
    )
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.micro_batch_size == 3
    assert config.tracking.tags == ["a", "b"]


def test_override_into_free_form_architecture_dict():
    config = load_config("demo", ["student.architecture.n_layer=3"])
    assert config.student.architecture["n_layer"] == 3


def test_yaml_file_path(tmp_path: Path):
    raw = load_config("demo").model_dump(mode="json")
    raw["train"]["epochs"] = 7
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(str(path)).train.epochs == 7


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.lrr=1"], "unknown key 'lrr' in train"),
        (["nosection.x=1"], "unknown key 'nosection' in top level"),
        (["train.lr=fast"], "train.lr"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
        (["distill.method=magic"], "distill.method"),
        (["teacher=null"], "needs a teacher"),
        (["data.max_prompt_tokens=600"], "max_prompt_tokens must be smaller"),
        (["train.min_lr=1"], "min_lr must not exceed lr"),
        (["train.lr"], "expected section.key=value"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("demo", overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_in_file_is_named(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "student: {architecture: {model_type: gpt2}, tokenizer: t}\ntrain: {epocs: 3}\n"
    )
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key"):
        load_config(str(path))


def test_missing_config_file_is_one_line():
    with pytest.raises(ConfigError, match="no such file and no shipped recipe"):
        load_config("does/not/exist.yaml")


def test_invalid_yaml_names_the_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(path))


def test_model_spec_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of name_or_path or architecture"):
        validate_config({"student": {"name_or_path": "x", "architecture": {"model_type": "gpt2"}}})


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=.inf",
        "train.projector_lr=.nan",
        "cot2align.epsilon=.inf",
        "cot2align.ot_weight=.inf",
        "distill.temperature=.nan",
        "distill.kd_rate=.nan",
    ],
)
def test_every_float_field_must_be_finite(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number") as info:
        load_config("demo", [override])
    assert "\n" not in str(info.value)


def test_fidelity_reference_sets_every_reference_behaviour_and_explicit_keys_win():
    from cot2align_ds.config import REFERENCE_SETTINGS

    base = {"student": {"name_or_path": "s"}, "teacher": {"name_or_path": "t"}}
    project = validate_config(base)
    reference = validate_config({**base, "fidelity": "reference"})
    for section, values in REFERENCE_SETTINGS.items():
        for key, value in values.items():
            assert getattr(getattr(reference, section), key) == value, (section, key)
            assert getattr(getattr(project, section), key) != value, (section, key)
    chosen = validate_config({**base, "fidelity": "reference", "eval": {"greedy": True}})
    assert chosen.eval.greedy is True and chosen.eval.max_length == 512
