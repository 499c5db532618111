"""The training config: YAML + command-line overrides, and one clear line for every mistake."""

from pathlib import Path

import pytest

from finetune.__main__ import main
from finetune.config import FinetuneConfig, parse_config
from finetune.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_command_line_overrides_the_yaml_file(tmp_path: Path):
    path = write_yaml(tmp_path, "learning_rate: 3.0e-4\nmax_steps: 7\nlora_r: 4\n")
    config = parse_config(["--config", str(path), "--learning-rate", "1e-4", "--max-steps", "9"])
    assert config.learning_rate == 1e-4
    assert config.max_steps == 9
    assert config.lora_r == 4  # from the file
    assert config.lora_alpha == FinetuneConfig().lora_alpha  # untouched default


def test_operator_facing_option_names_are_stable(tmp_path: Path):
    config = parse_config(
        [
            "--model",
            "some/model",
            "--dataset",
            "data/x",
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "12",
            "--resume",
        ]
    )
    assert (config.model, config.dataset, config.max_steps, config.resume) == (
        "some/model",
        "data/x",
        12,
        True,
    )
    assert config.run_dir == tmp_path / "run"


def test_yaml_lists_and_scientific_notation(tmp_path: Path):
    path = write_yaml(tmp_path, "learning_rate: 5e-5\nlora_target_modules: [q_proj, v_proj]\n")
    config = parse_config(["--config", str(path)])
    assert config.learning_rate == 5e-5  # YAML reads 5e-5 as text; it must still be a float
    assert config.target_modules == ["q_proj", "v_proj"]
    assert FinetuneConfig().target_modules == "all-linear"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lerning-rate", "1e-4"], "did you mean --learning-rate"),
        (["--max-steps", "ten"], "invalid int value: 'ten'"),
        (["--optim", "sgd"], "invalid choice: 'sgd'"),
        (["--lora-dropout", "1.5"], "lora_dropout=1.5"),
        (["--max-steps", "0"], "max_steps=0 must be at least 1"),
        (["--max-length", "4"], "max_length=4 is too short"),
        (["--config"], "--config needs a YAML file path"),
        (["--config", "/nonexistent/run.yaml"], "not found"),
    ],
)
def test_bad_command_lines_are_user_errors(argv: list[str], expected: str):
    with pytest.raises(UserError) as info:
        parse_config(argv)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lerning_rate: 1e-4\n", "unknown key 'lerning_rate' (did you mean learning_rate?)"),
        ("max_steps: 1.5\n", "max_steps=1.5 is not valid: input should be a valid integer"),
        ("packing: maybe\n", "Truthy value expected"),
        ("lr_scheduler_type: 5\n", "lr_scheduler_type=5 is not valid: input should be 'linear'"),
        ("lora_target_modules: q_proj\n", "lora_target_modules='q_proj' is not valid"),
        ("lora_dropout: 1.5\n", "lora_dropout=1.5 must be in [0, 1)"),
        ("- a list\n", "must hold key: value pairs"),
        ("max_steps: [1\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_files_are_user_errors(tmp_path: Path, text: str, expected: str):
    path = write_yaml(tmp_path, text)
    with pytest.raises(UserError) as info:
        parse_config(["--config", str(path)])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_a_saved_config_is_checked_like_a_new_one(tmp_path: Path):
    saved = write_yaml(tmp_path, "max_steps: ten\n")
    with pytest.raises(UserError, match=f"^{saved}: max_steps='ten' is not valid"):
        FinetuneConfig.load(saved)


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "mistral-7b-8gb.yaml", "mistral-7b-24gb.yaml"])
def test_shipped_configs_parse_and_round_trip(tmp_path: Path, name: str):
    config = parse_config(["--config", str(CONFIGS / name)])
    saved = tmp_path / "config.yaml"
    config.save(saved)
    assert FinetuneConfig.load(saved) == config


def test_cli_reports_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]):
    assert main(["--max-stesp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown option --max-stesp")
    assert len(err.strip().splitlines()) == 1


def test_training_without_a_run_directory_is_refused(capsys: pytest.CaptureFixture[str]):
    assert main(["--max-steps", "3"]) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", ["dpo-tiny-cpu.yaml", "dpo-smollm2-cpu.yaml", "dpo-mistral-7b-8gb.yaml"]
)
def test_shipped_dpo_configs_parse_and_round_trip(tmp_path: Path, name: str):
    from finetune.dpo_config import DpoConfig, parse_dpo_config

    config = parse_dpo_config(["--config", str(CONFIGS / name), "--adapter", "runs/x/adapter"])
    assert config.beta > 0 and config.adapter == "runs/x/adapter"
    saved = tmp_path / "config.yaml"
    config.save(saved)
    assert DpoConfig.load(saved) == config


def test_a_dpo_run_saved_with_the_old_lora_keys_still_loads(tmp_path: Path):
    """DPO configs used to carry (and ignore) the SFT keys: runs saved then must still resume."""
    from finetune.dpo_config import DpoConfig, parse_dpo_config

    config = parse_dpo_config(["--config", str(CONFIGS / "dpo-tiny-cpu.yaml")])
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml() + "lora_r: 16\npacking: false\ncheck_memory: true\n")
    assert DpoConfig.load(saved) == config
    with pytest.raises(UserError, match="unknown option --lora-r"):
        parse_dpo_config(["--lora-r", "16"])  # a new DPO run is told, not ignored


def test_dpo_keys_are_known_to_dpo_only(tmp_path: Path):
    from finetune.dpo_config import parse_dpo_config

    typo = tmp_path / "typo.yaml"
    typo.write_text("bta: 0.2\n")
    with pytest.raises(UserError, match="did you mean beta"):
        parse_dpo_config(["--config", str(typo)])
    dpo_only = tmp_path / "dpo-only.yaml"
    dpo_only.write_text("beta: 0.2\n")
    with pytest.raises(UserError, match="unknown key 'beta'"):
        parse_config(["--config", str(dpo_only)])
    with pytest.raises(UserError, match="see python -m finetune dpo --help"):
        parse_dpo_config(["--bogus-option", "1"])
