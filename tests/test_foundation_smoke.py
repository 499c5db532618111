from pathlib import Path


def test_fixtures_build_loadable_model_and_adapter(tiny_model_dir: Path, tiny_adapter_dir: Path):
    assert (tiny_model_dir / "config.json").is_file()
    assert (tiny_adapter_dir / "adapter_config.json").is_file()
    assert (tiny_adapter_dir / "chat_template.jinja").is_file()
