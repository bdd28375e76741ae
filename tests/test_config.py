"""Recipe and stage configs: validation, error messages, serialisation, schema, shipped samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import yaml

from swiss_knife.config import (
    CastConfig,
    CompressionConfig,
    DataConfig,
    EvaluateStageConfig,
    EvaluationConfig,
    ModelSpec,
    PerplexityConfig,
    load_config,
    load_recipe,
    read_config_file,
    recipe_schema,
    save_config,
    stage_name,
    validate_dict,
)
from swiss_knife.errors import ConfigError, OutputExistsError, UserInputError
from swiss_knife.samples import sample_names, sample_text, write_samples


def full_recipe() -> dict[str, Any]:
    """A recipe that sets something in every section, including non-default values."""
    return {
        "version": 1,
        "model": {"path": "some/dir", "dtype": "fp32", "device": "cpu", "revision": "main"},
        "data": {
            "eval": {"source": "eval.txt", "split_documents": "paragraph", "max_documents": 5},
            "calibration": {"source": "calib.jsonl", "field": "content", "add_bos": False},
        },
        "evaluation": {
            "perplexity": {"window": 64, "stride": 32, "batch_size": 2, "max_windows": None},
            "speed": {"enabled": False, "batch_sizes": [1, 2], "repeats": 5},
            "memory": False,
            "agreement": {"window": 32, "max_windows": 2},
            "bleu": {"references": "refs.jsonl", "max_new_tokens": 8},
            "harness": {"tasks": ["hellaswag"], "limit": 10},
            "seed": 7,
        },
        "evaluate_original": False,
        "stages": [
            {"type": "cast", "name": "half", "dtype": "fp16", "evaluate": False},
            {
                "type": "evaluate",
                "name": "check",
                "evaluation": {"perplexity": {"window": 16}, "speed": {"enabled": False}},
            },
        ],
        "output_dir": "runs/x",
        "seed": 3,
    }


def config_error(data: Any, cls: type = CompressionConfig) -> str:
    with pytest.raises(ConfigError) as info:
        validate_dict(cls, data, "recipe.yaml")
    return str(info.value)


def problem_lines(message: str) -> list[str]:
    """The problems a message lists: one line per problem, or the one problem on the first line."""
    listed = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    if listed or "problem(s):" in message:
        return listed
    return [message.split(": ", 1)[1]]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    config = validate_dict(CompressionConfig, full_recipe())
    path = tmp_path / f"recipe{suffix}"
    save_config(config, path)
    loaded = load_config(path, CompressionConfig)
    assert loaded == config
    assert loaded.stages[0] == CastConfig(name="half", dtype="fp16", evaluate=False)
    assert isinstance(loaded.stages[1], EvaluateStageConfig)
    assert loaded.evaluation.perplexity.max_windows is None
    # The file is really of the format its extension names.
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        assert json.loads(text)["model"]["path"] == "some/dir"
    else:
        assert yaml.safe_load(text)["stages"][0]["dtype"] == "fp16"
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_round_trip_of_defaults(tmp_path: Path) -> None:
    config = CompressionConfig(model=ModelSpec(path="m"))
    for name in ("r.json", "r.yaml"):
        save_config(config, tmp_path / name)
        assert load_recipe(tmp_path / name) == config


def test_stage_config_round_trip(tmp_path: Path) -> None:
    config = CastConfig(dtype="fp16", name="x")
    save_config(config, tmp_path / "cast.yaml")
    assert load_config(tmp_path / "cast.yaml", CastConfig) == config


def test_configs_are_frozen() -> None:
    config = CastConfig()
    with pytest.raises(Exception, match="frozen"):
        config.dtype = "fp16"  # type: ignore[misc]


def test_defaults() -> None:
    config = validate_dict(CompressionConfig, {"model": "m"})
    assert config.model == ModelSpec(path="m", dtype="auto", device="auto")
    assert config.model.trust_remote_code is False
    assert config.stages == []
    assert config.data.eval is None and config.data.calibration is None
    assert config.evaluation == EvaluationConfig()
    assert config.evaluation.perplexity.window == 512
    assert config.evaluate_original is True


def test_calibration_batch_defaults_to_1024_tokens_per_forward() -> None:
    from swiss_knife.calibration import _check_batch_size
    from swiss_knife.config import CalibrationSettings

    assert CalibrationSettings().batch_size == 2  # 512-token windows
    assert CalibrationSettings(seq_len=64).batch_size == 16
    assert CalibrationSettings(seq_len=4096).batch_size == 1
    assert CalibrationSettings(seq_len=64, batch_size=3).batch_size == 3
    assert validate_dict(CalibrationSettings, {"seq_len": 128}).batch_size == 8
    # The walk's own default, for the Python functions called without a config.
    assert _check_batch_size(None, torch.zeros(5, 256, dtype=torch.long)) == 4
    assert _check_batch_size(3, torch.zeros(5, 256, dtype=torch.long)) == 3


# --------------------------------------------------------------------------- shorthands


def test_model_shorthand() -> None:
    config = validate_dict(CompressionConfig, {"model": "org/name"})
    assert config.model == ModelSpec(path="org/name")


def test_data_shorthand() -> None:
    config = validate_dict(
        CompressionConfig, {"model": "m", "data": {"eval": "wiki.txt", "calibration": "c.jsonl"}}
    )
    assert config.data.eval == DataConfig(source="wiki.txt")
    assert config.data.calibration == DataConfig(source="c.jsonl")
    assert config.data.eval.field == "text" and config.data.eval.add_bos is True


def test_missing_model_is_reported() -> None:
    message = config_error({"stages": []})
    assert "model" in message and "Field required" in message


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("data", "path", "suggestion"),
    [
        ({"model": "m", "stagse": []}, "stagse", "stages"),
        ({"model": {"path": "m", "dtyp": "fp32"}}, "model.dtyp", "dtype"),
        (
            {"model": "m", "data": {"eval": {"source": "a", "feild": "t"}}},
            "data.eval.feild",
            "field",
        ),
        ({"model": "m", "stages": [{"type": "cast", "dtpye": "bf16"}]}, "stages[0].dtpye", "dtype"),
        (
            {"model": "m", "stages": [{"type": "cast"}, {"type": "evaluate", "evaluaton": {}}]},
            "stages[1].evaluaton",
            "evaluation",
        ),
        (
            {
                "model": "m",
                "stages": [
                    {"type": "evaluate", "evaluation": {"perplexity": {"stide": 4}}},
                ],
            },
            "stages[0].evaluation.perplexity.stide",
            "stride",
        ),
        (
            {"model": "m", "evaluation": {"speed": {"batch_size": [1]}}},
            "evaluation.speed.batch_size",
            "batch_sizes",
        ),
    ],
)
def test_unknown_key_names_closest_valid_key(data: Any, path: str, suggestion: str) -> None:
    lines = problem_lines(config_error(data))
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith(f"{path}: unknown key")
    assert f"did you mean {suggestion!r}?" in line
    assert suggestion in line.split("valid keys: ")[1].split(", ")


def test_unknown_key_in_evaluate_stage_lists_that_stages_keys() -> None:
    line = problem_lines(config_error({"model": "m", "stages": [{"type": "evaluate", "x": 1}]}))[0]
    valid = line.split("valid keys: ")[1].split(", ")
    assert valid == sorted(EvaluateStageConfig.model_fields)
    assert "dtype" not in valid


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    line = problem_lines(config_error({"model": "m", "zzzzzz": 1}))[0]
    assert "did you mean" not in line
    assert "valid keys: data, evaluate_original, evaluation, model" in line


def test_unknown_key_in_stage_config_alone() -> None:
    line = problem_lines(config_error({"dtype": "bf16", "evalute": True}, CastConfig))[0]
    assert line.startswith("evalute: unknown key") and "did you mean 'evaluate'?" in line


# --------------------------------------------------------------------------- types and ranges


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"model": {"path": "m", "dtype": "int3"}}, "model.dtype"),
        ({"model": {"path": "m", "device": "tpu"}}, "model.device"),
        ({"model": {"path": "m", "trust_remote_code": "maybe"}}, "model.trust_remote_code"),
        ({"model": {"path": 5}}, "model.path"),
        (
            {"model": "m", "evaluation": {"perplexity": {"window": 1}}},
            "evaluation.perplexity.window",
        ),
        (
            {"model": "m", "evaluation": {"perplexity": {"window": "big"}}},
            "evaluation.perplexity.window",
        ),
        (
            {"model": "m", "evaluation": {"perplexity": {"stride": 0}}},
            "evaluation.perplexity.stride",
        ),
        (
            {"model": "m", "evaluation": {"speed": {"batch_sizes": []}}},
            "evaluation.speed.batch_sizes",
        ),
        (
            {"model": "m", "evaluation": {"speed": {"batch_sizes": [1, 0]}}},
            "evaluation.speed.batch_sizes[1]",
        ),
        ({"model": "m", "evaluation": {"speed": {"warmup": -1}}}, "evaluation.speed.warmup"),
        (
            {"model": "m", "data": {"eval": {"source": "a", "max_documents": 0}}},
            "data.eval.max_documents",
        ),
        (
            {"model": "m", "data": {"eval": {"source": "a", "split_documents": "word"}}},
            "data.eval.split_documents",
        ),
        ({"model": "m", "version": 2}, "version"),
        ({"model": "m", "stages": [{"type": "cast", "dtype": "int8"}]}, "stages[0].dtype"),
        ({"model": "m", "stages": [{"type": "cast", "name": "bad name/"}]}, "stages[0].name"),
        ({"model": "m", "stages": {"type": "cast"}}, "stages"),
    ],
)
def test_wrong_type_or_range_is_reported_with_its_path(data: Any, path: str) -> None:
    message = config_error(data)
    assert message.startswith("recipe.yaml: ") and "\n" not in message  # one problem, one line
    lines = problem_lines(message)
    assert [line.split(": ")[0] for line in lines] == [path]


def test_unknown_stage_type_names_the_valid_types() -> None:
    line = problem_lines(config_error({"model": "m", "stages": [{"type": "zap"}]}))[0]
    assert line.startswith("stages[0]:")
    assert "'prune'" in line and "'cast'" in line and "'evaluate'" in line


def test_stage_without_method_lists_the_methods() -> None:
    line = problem_lines(config_error({"model": "m", "stages": [{"type": "prune"}]}))[0]
    assert line.startswith("stages[0]: missing key 'method'")
    assert "wanda" in line and "structured" in line and "bf16" not in line


def test_stage_without_type_is_an_error() -> None:
    line = problem_lines(config_error({"model": "m", "stages": [{"dtype": "bf16"}]}))[0]
    assert line.startswith("stages[0]:") and "type" in line


def test_all_problems_are_reported_at_once() -> None:
    data = {
        "model": {"path": "m", "dtype": "fp8", "trsut_remote_code": True},
        "data": {"eval": {"source": "a", "max_documents": -1}},
        "evaluation": {"perplexity": {"window": 0}, "speed": {"repeats": 0}},
        "stages": [
            {"type": "cast", "dtype": "bf16"},
            {"type": "cast", "dtype": "int4"},
            {"type": "evaluate", "evalution": {}},
        ],
        "sedd": 1,
    }
    message = config_error(data)
    assert message.startswith("recipe.yaml: 8 problem(s):")
    paths = {line.split(": ")[0] for line in problem_lines(message)}
    assert paths == {
        "model.dtype",
        "model.trsut_remote_code",
        "data.eval.max_documents",
        "evaluation.perplexity.window",
        "evaluation.speed.repeats",
        "stages[1].dtype",
        "stages[2].evalution",
        "sedd",
    }
    # Pydantic's internal discriminator tag never appears in a path the user reads.
    assert "stages[1].cast" not in message and ".evaluate." not in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    for text in ("- a\n- b\n", "", "just a string\n"):
        path = tmp_path / "r.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match="expected a mapping at the top level"):
            load_recipe(path)


# --------------------------------------------------------------------------- cross-field checks


def test_duplicate_stage_names() -> None:
    stages = [{"type": "cast", "name": "a"}, {"type": "evaluate", "name": "a"}]
    message = config_error({"model": "m", "stages": stages})
    assert "'a' is used twice" in message


def test_explicit_name_clashing_with_default_name() -> None:
    stages = [{"type": "cast"}, {"type": "cast", "name": "00-cast"}]
    assert "'00-cast' is used twice" in config_error({"model": "m", "stages": stages})


def test_default_stage_names_are_unique_by_index() -> None:
    config = validate_dict(
        CompressionConfig, {"model": "m", "stages": [{"type": "cast"}, {"type": "cast"}]}
    )
    assert [stage_name(s, i) for i, s in enumerate(config.stages)] == ["00-cast", "01-cast"]


def test_stride_larger_than_window() -> None:
    message = config_error({"model": "m", "evaluation": {"perplexity": {"window": 8, "stride": 9}}})
    assert "evaluation.perplexity" in message
    assert "stride (9) must not exceed window (8)" in message
    # Equal is fine, and so is smaller.
    assert PerplexityConfig(window=8, stride=8).stride == 8
    assert PerplexityConfig(window=8, stride=3).stride == 3
    with pytest.raises(ValueError, match="must not exceed"):
        PerplexityConfig(window=8, stride=9)


def test_config_error_is_a_user_input_error() -> None:
    with pytest.raises(UserInputError) as info:
        validate_dict(CompressionConfig, {"x": 1})
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- files


def test_load_from_file_reports_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nstages:\n  - type: cast\n    dtype: fp8\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: stages[0].dtype: ")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_unparsable_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("model: [unclosed\n", encoding="utf-8")
    (tmp_path / "b.json").write_text('{"model": "m",}', encoding="utf-8")
    for name in ("a.yaml", "b.json"):
        with pytest.raises(ConfigError, match=r"not valid (YAML|JSON)") as info:
            load_recipe(tmp_path / name)
        assert "\n" not in str(info.value)
        assert ("line 2, column 1" if name == "a.yaml" else "b.json:1:15") in str(info.value)


def test_non_utf8_config(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(path)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f"model: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError):
        load_recipe(path)
    assert not marker.exists()
    # The same with a constructor that would build arbitrary Python objects.
    path.write_text("model: !!python/object/new:builtins.dict {}\n", encoding="utf-8")
    with pytest.raises(ConfigError):
        read_config_file(path)


def test_json_is_a_serialised_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(full_recipe()), encoding="utf-8")
    assert load_recipe(path) == validate_dict(CompressionConfig, full_recipe())


# --------------------------------------------------------------------------- schema


def test_recipe_schema_is_valid_json_schema() -> None:
    schema = recipe_schema()
    assert schema["title"] == "Swiss Knife recipe"
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    validator.validate(full_recipe())
    validator.validate({"model": {"path": "m"}, "stages": [{"type": "cast"}]})
    # The shorthands the validators accept are valid for the schema too.
    validator.validate({"model": "m", "data": {"eval": "x.txt", "calibration": None}})
    # The schema agrees with pydantic on what is wrong.
    assert not validator.is_valid({"model": {"path": "m"}, "stagse": []})
    assert not validator.is_valid({"model": {"path": "m"}, "stages": [{"type": "prune"}]})
    assert not validator.is_valid({"model": {"path": "m", "dtype": "int3"}})
    assert not validator.is_valid({"stages": []})
    # It is plain JSON.
    assert json.loads(json.dumps(schema)) == schema


def test_schema_documents_fields() -> None:
    text = json.dumps(recipe_schema())
    assert "trust_remote_code" in text
    assert "Run modelling code shipped with the checkpoint" in text


# --------------------------------------------------------------------------- samples


def test_there_are_samples() -> None:
    assert {"cast.yaml", "evaluate.yaml", "pipeline.yaml"} <= set(sample_names())


@pytest.mark.parametrize("name", sample_names())
def test_every_sample_validates(tmp_path: Path, name: str) -> None:
    data = yaml.safe_load(sample_text(name))
    config = validate_dict(CompressionConfig, data, name)
    assert config.stages, f"{name} has no stages"
    jsonschema.validate(data, recipe_schema())
    # Samples teach through comments.
    assert sample_text(name).lstrip().startswith("#")


def test_write_samples(tmp_path: Path) -> None:
    out = tmp_path / "configs"
    written = write_samples(out)
    assert sorted(p.name for p in written) == sample_names()
    for path in written:
        assert path.read_text(encoding="utf-8") == sample_text(path.name)
        assert isinstance(load_recipe(path), CompressionConfig)


def test_write_samples_refuses_to_overwrite(tmp_path: Path) -> None:
    name = sample_names()[0]
    (tmp_path / name).write_text("mine\n", encoding="utf-8")
    with pytest.raises(OutputExistsError, match=name):
        write_samples(tmp_path)
    assert (tmp_path / name).read_text(encoding="utf-8") == "mine\n"
    # Nothing else was written either.
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    write_samples(tmp_path, overwrite=True)
    assert (tmp_path / name).read_text(encoding="utf-8") == sample_text(name)
