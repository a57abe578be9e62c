"""Wheels that ``python -m bench.gpu`` needs on the GPU machine and its image lacks, in ``.whl/``.

The GPU machine (Python 3.12, x86-64) cannot reach a package registry; its image holds torch,
transformers, tokenizers, safetensors, huggingface-hub, numpy, PyYAML, prometheus-client and
nvidia-ml-py, but not the worker's pydantic, pydantic-settings, structlog or orjson. This
script, run here where PyPI is reachable:

1. traces the imports of the scorer path (``bench.gpu``, ``worker.scoring.nli``,
   ``worker.config.settings``, ``tests.support.models``): every distribution that project
   code, or a carried distribution, imports must be carried or be in the image;
2. walks the carried distributions' ``Requires-Dist`` (markers evaluated for the target
   Python): none may be missing from the bundle and the image together;
3. ``pip download``s each carried distribution at the version installed in this interpreter
   (``.venv``), for CPython ``--python-version`` on manylinux x86-64, into ``--dest``
   (old wheels there are removed first: two versions of one package stop the install);
4. opens every wheel (CRC check of each member, its METADATA names the pinned version) and
   prints the sizes and the total, failing above ``MAX_BUNDLE_BYTES``.

``make gpu-bundle`` runs it. ``bench/gpu-run.sh`` installs the wheels on the GPU machine.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

from packaging.markers import Marker
from packaging.requirements import Requirement

REPO: Final = Path(__file__).resolve().parents[1]
DEFAULT_DEST: Final = REPO / ".whl"
# The GPU image's python3 (3.12.3, as read there in 2026-11).
DEFAULT_PYTHON_VERSION: Final = "3.12"
# pip matches manylinux tags exactly; these cover every wheel of the bundle's packages.
PLATFORMS: Final = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# Carried: what the scorer path imports and the image lacks, and what those import.
BUNDLE: Final = (
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",  # pydantic-settings imports dotenv
    "typing-inspection",  # pydantic imports it
    "annotated-types",  # pydantic imports it
    # The image has one, of unknown version; pydantic-core 2.50 needs >= 4.16 (46 kB).
    "typing-extensions",
    "structlog",
    "orjson",
    # The image has PyYAML (huggingface_hub imports it); carried as well so that the bundle
    # alone covers everything but the torch stack, as the image-like check requires (850 kB).
    "PyYAML",
)
# In the GPU image (its package list, 2026-11): may be imported without being carried.
IMAGE: Final = frozenset(
    {
        "torch",
        "triton",
        "transformers",
        "tokenizers",
        "safetensors",
        "huggingface-hub",
        "hf-xet",
        "numpy",
        "pyyaml",
        "typing-extensions",
        "packaging",
        "filelock",
        "fsspec",
        "regex",
        "requests",
        "tqdm",
        "jinja2",
        "markupsafe",
        "sympy",
        "mpmath",
        "networkx",
        "sentencepiece",
        "protobuf",
        "prometheus-client",
        "nvidia-ml-py",
        "psutil",
        "httpx",
        "anyio",
        "h11",
        "httpcore",
        "idna",
        "certifi",
        "rich",
        "pygments",
        "scipy",
        "setuptools",
    }
)
# What bench/gpu.py imports, lazily imports included (its functions import these).
SCORER_PATH: Final = (
    "bench.gpu",
    "worker.scoring.nli",
    "worker.scoring.runtime",
    "worker.config.settings",
    "worker.contract.scorer",
    "tests.support.models",
)
PROJECT: Final = frozenset({"bench", "tests", "worker"})
# Half of the 64 MiB that travels with one device call: the working tree needs the rest.
MAX_BUNDLE_BYTES: Final = 32 * 2**20
EXIT_INCOMPLETE: Final = 2
EXIT_DOWNLOAD: Final = 3
EXIT_BAD_WHEEL: Final = 4


def canonical(name: str) -> str:
    """PEP 503 name: ``PyYAML`` and ``pyyaml``, ``typing_extensions`` and ``-extensions`` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


BUNDLED: Final = frozenset(canonical(name) for name in BUNDLE)


def pinned(names: Iterable[str]) -> dict[str, str]:
    """``{name: installed version}``; SystemExit naming what is not installed here."""
    versions: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"not installed in {sys.executable}: {', '.join(missing)} (make setup)")
    return versions


def _target_environment(python_version: str) -> dict[str, str]:
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }


def requirement_closure(roots: Iterable[str], python_version: str) -> dict[str, set[str]]:
    """Every distribution the ``roots`` require (installed metadata, no extras, markers
    evaluated for CPython ``python_version`` on Linux x86-64): ``{required: {required by}}``."""
    environment = _target_environment(python_version)
    needed: dict[str, set[str]] = {}
    queue = [canonical(root) for root in roots]
    seen: set[str] = set()
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            marker: Marker | None = requirement.marker
            if marker is not None and not marker.evaluate(environment):
                continue
            dependency = canonical(requirement.name)
            needed.setdefault(dependency, set()).add(name)
            queue.append(dependency)
    return needed


def traced_imports(modules: Sequence[str]) -> set[tuple[str, str]]:
    """(importer's top-level package, imported top-level module) of every successful
    absolute import statement run while ``modules`` are imported (cached modules too)."""
    edges: set[tuple[str, str]] = set()
    original = builtins.__import__

    def tracing(
        name: str,
        globals: Mapping[str, object] | None = None,  # __import__'s own names
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] | None = (),
        level: int = 0,
    ) -> ModuleType:
        module = original(name, globals, locals, fromlist, level)
        # Recorded once it succeeded: a failed import is an optional one (structlog tries
        # colorama, rich, greenlet... and does without).
        if level == 0 and globals is not None:
            importer = str(globals.get("__name__") or "").partition(".")[0]
            edges.add((importer, name.partition(".")[0]))
        return module

    builtins.__import__ = tracing
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        builtins.__import__ = original
    return edges


def imported_distributions(modules: Sequence[str]) -> tuple[dict[str, set[str]], set[str]]:
    """Distributions the scorer path needs: imported by project code, or by a module of a
    distribution that is itself needed and not in the image. ``({dist: {importers}},
    {modules of no known distribution})``."""
    edges = traced_imports(modules)
    owners = {top: {canonical(d) for d in dists} for top, dists in _packages_distributions()}
    stdlib = set(sys.stdlib_module_names) | {"__main__", "builtins"}
    needed: dict[str, set[str]] = {}
    unknown: set[str] = set()
    changed = True
    while changed:
        changed = False
        for importer, imported in sorted(edges):
            if imported in stdlib or imported in PROJECT or imported == importer:
                continue
            carried_importer = importer in PROJECT or any(
                dist in needed and dist not in IMAGE for dist in owners.get(importer, ())
            )
            if not carried_importer:
                continue
            dists = owners.get(imported)
            if not dists:
                unknown.add(imported)
                continue
            for dist in dists:
                if importer not in needed.setdefault(dist, set()):
                    needed[dist].add(importer)
                    changed = True
    return needed, unknown


def _packages_distributions() -> Iterable[tuple[str, list[str]]]:
    return importlib.metadata.packages_distributions().items()


def check_complete(python_version: str, *, trace: bool) -> list[str]:
    """Problems: distributions needed on the device that are neither carried nor in the image."""
    problems: list[str] = []
    covered = BUNDLED | IMAGE
    if trace:
        needed, unknown = imported_distributions(SCORER_PATH)
        print("imported by the scorer path (or by a carried package):")
        for dist in sorted(needed):
            where = "carried" if dist in BUNDLED else "image" if dist in IMAGE else "MISSING"
            print(f"  {dist:22} {where:8} <- {', '.join(sorted(needed[dist]))}")
            if where == "MISSING":
                problems.append(f"{dist} is imported by {sorted(needed[dist])}, not carried")
        problems += [f"module {name!r} belongs to no installed distribution" for name in unknown]
        unused = sorted(BUNDLED - set(needed))
        if unused:
            print(f"  carried but not imported on the path: {', '.join(unused)}")
    for dist, parents in sorted(requirement_closure(BUNDLE, python_version).items()):
        if dist not in covered:
            problems.append(f"{dist} is required by {sorted(parents)}, not carried")
    return problems


def download(versions: Mapping[str, str], dest: Path, python_version: str) -> None:
    """``pip download`` the pinned wheels for CPython ``python_version``, manylinux x86-64."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *(flag for platform in PLATFORMS for flag in ("--platform", platform)),
        "--dest",
        str(dest),
        *(f"{name}=={version}" for name, version in versions.items()),
    ]
    print(f"downloading {len(versions)} wheels for CPython {python_version} into {dest} ...")
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit(EXIT_DOWNLOAD)


def _wheel_metadata(wheel: Path) -> tuple[str, str]:
    """(Name, Version) from the wheel's METADATA, after checking every member's CRC."""
    with zipfile.ZipFile(wheel) as archive:
        broken = archive.testzip()
        if broken is not None:
            raise ValueError(f"{wheel.name}: member {broken} fails its CRC check")
        metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        if metadata is None:
            raise ValueError(f"{wheel.name}: no .dist-info/METADATA")
        fields = dict(
            line.split(": ", 1)
            for line in archive.read(metadata).decode("utf-8").splitlines()
            if line.startswith(("Name: ", "Version: "))
        )
    return fields["Name"], fields["Version"]


def verify(versions: Mapping[str, str], dest: Path, python_version: str) -> int:
    """Check one readable wheel per pinned version, compatible with ``python_version``;
    print the list; return the total size in bytes."""
    found: dict[str, str] = {}
    wanted = {canonical(name): version for name, version in versions.items()}
    tag = f"cp{python_version.replace('.', '')}"
    total = 0
    print(f"\n{'wheel':94} {'kB':>7}")
    for wheel in sorted(dest.glob("*.whl")):
        name, version = _wheel_metadata(wheel)
        python_tag = wheel.name.split("-")[-3]
        if tag not in python_tag.split(".") and not python_tag.startswith("py3"):
            raise ValueError(f"{wheel.name}: not for CPython {python_version}")
        found[canonical(name)] = version
        size = wheel.stat().st_size
        total += size
        print(f"{wheel.name:94} {size / 1000:7.0f}")
    if found != wanted:
        raise ValueError(f"wheels {found} do not match the pins {wanted}")
    print(f"{len(found)} wheels, {total / 2**20:.2f} MiB in {dest}")
    return total


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="folder for the wheels")
    parser.add_argument(
        "--python-version",
        default=DEFAULT_PYTHON_VERSION,
        help="the CPython the wheels are for (3.12 on the GPU machine; 3.11 for a local check)",
    )
    parser.add_argument(
        "--no-trace", action="store_true", help="skip importing the scorer path (torch: seconds)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problems = check_complete(args.python_version, trace=not args.no_trace)
    if problems:
        print("the bundle is incomplete:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_INCOMPLETE
    versions = pinned(BUNDLE)
    download(versions, args.dest, args.python_version)
    try:
        total = verify(versions, args.dest, args.python_version)
    except (ValueError, zipfile.BadZipFile) as exc:
        print(f"bad bundle: {exc}", file=sys.stderr)
        return EXIT_BAD_WHEEL
    if total > MAX_BUNDLE_BYTES:
        print(f"the bundle is over {MAX_BUNDLE_BYTES / 2**20:.0f} MiB", file=sys.stderr)
        return EXIT_BAD_WHEEL
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
