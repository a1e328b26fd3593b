"""The docs stay true to the code."""

from pathlib import Path

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    names = [
        field.validation_alias.choices[0] if field.validation_alias else f"GPTOSS_{name.upper()}"  # type: ignore[union-attr]
        for name, field in Settings.model_fields.items()
    ]
    missing = [name for name in names if f"`{name}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"


def test_every_code_folder_has_a_readme() -> None:
    for folder in ("api", "scheduler", "workers", "shared", "compose"):
        assert (ROOT / folder / "README.md").read_text().strip()
