"""The reference docs are generated from the code; they must not drift from it."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lafid.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command, doc", [("stages", "docs/recipes.md"), ("schema", "docs/schema.md")])
def test_reference_docs_match_the_code(command, doc):
    generated = CliRunner().invoke(app, [command]).output
    text = (ROOT / doc).read_text()
    assert generated.strip() in text, f"{doc} is stale: regenerate with `lafid {command}`"


def test_readme_names_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
