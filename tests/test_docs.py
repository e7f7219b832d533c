"""The docs match the code: the README's config reference and the example config are
generated from, or checked against, the one declaration of each setting."""

from pathlib import Path

from meteorit import config

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_reference_is_current() -> None:
    assert config.reference_markdown() in (ROOT / "README.md").read_text(), (
        "regenerate the README table with: python -c 'from meteorit.config import "
        "reference_markdown; print(reference_markdown())'")


def test_example_config_is_valid_and_documents_every_key() -> None:
    path = ROOT / "conf" / "meteorit.toml"
    cfg = config.load(str(path), env={})
    text = path.read_text()
    missing = [s.name for s in config.SETTINGS if f"\n{s.key} = " not in text]
    assert missing == []
    assert cfg.redis.url == "embedded"


def test_readme_starts_with_the_two_setup_commands() -> None:
    head = (ROOT / "README.md").read_text().split("## ", 1)[0]
    assert "make run" in head and "make test" in head
