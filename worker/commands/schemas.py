"""``tagstream schemas``: write (or check) the JSON Schema files of the event contract.

The schemas are generated from the pydantic models in :mod:`worker.contract.events`, so they can
never disagree with what the worker accepts and emits; the committed copies under
``schemas/`` are for consumers in other languages. ``--check`` exits 1 when a committed
file differs from the models (CI runs it so a contract change cannot go unnoticed).

The input schema is the validation view (what producers may send; unknown fields are
allowed and ignored). The configurable limits ``max_text_chars`` and ``max_labels``
are enforced at run time and therefore not in the schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from worker.contract.events import InputEvent, ScoredEvent
from worker.exit_codes import EXIT_DRIFT, EXIT_OK

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_DIR_NAME: Final = "schemas"
JSON_INDENT: Final = 2
# File name -> (model, pydantic schema mode): inputs are validated, outputs serialised.
SCHEMAS: Final[dict[str, tuple[type[BaseModel], JsonSchemaMode]]] = {
    "input-event.schema.json": (InputEvent, "validation"),
    "scored-event.schema.json": (ScoredEvent, "serialization"),
}


def default_out_dir() -> Path:
    """``schemas/`` at the root of the source checkout, else in the current directory."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "worker").is_dir():
        return root / SCHEMA_DIR_NAME
    return Path.cwd() / SCHEMA_DIR_NAME


def render_schema(model: type[BaseModel], mode: JsonSchemaMode) -> str:
    """Pretty, key-sorted JSON Schema text with a trailing newline (stable across runs)."""
    schema: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        **model.model_json_schema(mode=mode),
    }
    return json.dumps(schema, indent=JSON_INDENT, sort_keys=True, ensure_ascii=False) + "\n"


def render_schemas() -> dict[str, str]:
    """File name -> schema text, for every file ``tagstream schemas`` writes."""
    return {name: render_schema(model, mode) for name, (model, mode) in SCHEMAS.items()}


def write_schemas(out_dir: Path) -> list[Path]:
    """Write every schema file into ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(out_dir: Path) -> list[Path]:
    """Schema files in ``out_dir`` that are missing or differ from the models."""
    stale = []
    for name, text in render_schemas().items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
    return stale


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory of the schema files (default: schemas/ in the checkout or cwd)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a file is missing or differs from the models",
    )


def execute(args: argparse.Namespace) -> int:
    out_dir: Path = args.out if args.out is not None else default_out_dir()
    if args.check:
        stale = stale_schemas(out_dir)
        for path in stale:
            print(f"{path}: out of date with worker/events.py", file=sys.stderr)
        if stale:
            print("run `tagstream schemas` and commit the result", file=sys.stderr)
            return EXIT_DRIFT
        return EXIT_OK
    for path in write_schemas(out_dir):
        print(f"wrote {path}")
    return EXIT_OK
