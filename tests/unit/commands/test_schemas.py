"""The committed JSON Schema files match the pydantic event models (``tagstream schemas``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.cli import main
from worker.commands.schemas import SCHEMAS, default_out_dir, render_schemas

REPO_ROOT = Path(__file__).resolve().parents[3]
COMMITTED = REPO_ROOT / "schemas"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_matches_the_models(name: str) -> None:
    path = COMMITTED / name
    assert path.is_file(), f"{path} is missing: run `tagstream schemas`"
    assert path.read_text(encoding="utf-8") == render_schemas()[name], (
        f"{path} drifted from worker/events.py: run `tagstream schemas` and commit it"
    )


def test_check_passes_on_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert default_out_dir() == COMMITTED
    assert main(["schemas", "--check"]) == 0
    assert capsys.readouterr().err == ""


def test_write_then_check_then_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", "--out", str(tmp_path)]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(SCHEMAS)
    assert main(["schemas", "--check", "--out", str(tmp_path)]) == 0
    capsys.readouterr()

    scored = tmp_path / "scored-event.schema.json"
    scored.write_text(scored.read_text(encoding="utf-8").replace('"tags"', '"tag"'))
    (tmp_path / "input-event.schema.json").unlink()
    assert main(["schemas", "--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "scored-event.schema.json: out of date" in err
    assert "input-event.schema.json: out of date" in err


def test_schema_files_are_pretty_sorted_and_newline_terminated() -> None:
    for name, text in render_schemas().items():
        assert text.endswith("}\n"), name
        schema = json.loads(text)
        assert text == json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schemas_describe_the_contract() -> None:
    rendered = render_schemas()
    input_schema = json.loads(rendered["input-event.schema.json"])
    assert input_schema["required"] == ["text"]
    assert "additionalProperties" not in input_schema  # unknown fields are allowed
    scored = json.loads(rendered["scored-event.schema.json"])
    assert set(scored["required"]) >= {"id", "source", "labels", "scores", "tags", "scored_at"}
    assert "nli" not in scored["required"]
    score_items = scored["properties"]["scores"]["items"]
    assert (score_items["minimum"], score_items["maximum"]) == (0.0, 1.0)
    assert scored["properties"]["scored_at"]["format"] == "date-time"
