"""The docs stay true to the code."""

from pathlib import Path

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`GPTOSS_{name.upper()}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"


def test_every_code_folder_has_a_readme() -> None:
    for folder in ("api", "scheduler", "workers", "shared", "compose"):
        assert (ROOT / folder / "README.md").read_text().strip()
