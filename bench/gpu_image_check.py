"""Check here, on a CPU, that the GPU image plus ``make gpu-bundle``'s wheels run bench/gpu.py.

An image-like interpreter is built from this checkout's ``.venv``:

1. a fresh venv (``--venv``, this Python's base interpreter) that sees, through a ``.pth``
   file, a folder of symbolic links (``--links``) to the torch stack only: torch,
   transformers, tokenizers, safetensors, huggingface-hub, numpy and prometheus-client as
   installed in ``.venv``, with what they require. Every distribution the bundle carries
   (pydantic..., structlog, orjson, PyYAML, typing-extensions) is left out, and so are
   confluent-kafka and the worker itself; the script checks that none of them imports;
2. the bundle's wheels, downloaded for *this* Python (``--wheels``; the GPU machine's are
   for 3.12, this machine runs another), installed by ``bench/gpu-run.sh`` into ``--site``;
3. ``bench/gpu-run.sh --dry-run`` with that interpreter: the device's command, on the CPU;
4. with ``--python312 PATH`` (a CPython 3.12 here), the 3.12 wheels of ``.whl`` installed
   into a folder of their own and imported there, with the worker's settings built from
   them (torch is not needed for that part of the chain).

``make gpu-image-check`` runs it; the exit code is the first failing step's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from bench import gpu_bundle

REPO: Final = Path(__file__).resolve().parents[1]
# What the GPU image provides of the scorer path (the rest of its list is not imported).
IMAGE_ROOTS: Final = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "numpy",
    "prometheus-client",
)
# Must not import in the image-like interpreter before the bundle is installed.
ABSENT_MODULES: Final = (
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
    "dotenv",
    "structlog",
    "orjson",
    "yaml",
    "typing_extensions",
    "confluent_kafka",
    "worker",
)
# The worker's modules that need the bundle but not torch: imported under Python 3.12.
TORCHLESS_CHECK: Final = (
    "import dotenv, orjson, pydantic_core, structlog, yaml\n"
    "from worker.config.settings import ModelSettings\n"
    "s = ModelSettings(model='/tmp/m', device='cpu', dtype='bfloat16')\n"
    "print('python', __import__('sys').version.split()[0], 'pydantic', "
    "__import__('pydantic').VERSION, 'settings ok:', s.dtype, s.max_batch_tokens)\n"
)
EXIT_SETUP: Final = 5


def image_distributions(python_version: str) -> list[str]:
    """The image's roots and everything they require, as installed here, minus the bundle."""
    closure = gpu_bundle.requirement_closure(IMAGE_ROOTS, python_version)
    names = {gpu_bundle.canonical(root) for root in IMAGE_ROOTS} | set(closure)
    installed = []
    for name in sorted(names - gpu_bundle.BUNDLED):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional platform package not installed here
        installed.append(name)
    return installed


def top_level_entries(names: Iterable[str]) -> dict[str, set[str]]:
    """``{site-packages entry: {distributions}}`` of the distributions' installed files."""
    entries: dict[str, set[str]] = {}
    for name in names:
        for file in importlib.metadata.distribution(name).files or ():
            first = file.parts[0]
            if first in ("..", "__pycache__"):
                continue
            entries.setdefault(first, set()).add(name)
    return entries


def link_image(links: Path, python_version: str) -> list[str]:
    """Symbolic links in ``links`` to the image's distributions in this site-packages."""
    site = Path(str(importlib.metadata.distribution("torch").locate_file("")))
    wanted = image_distributions(python_version)
    entries = top_level_entries(wanted)
    carried = top_level_entries(
        name for name in gpu_bundle.BUNDLED if _installed(name)
    )  # the bundle's own entries must not come in through a shared folder
    shared = sorted(set(entries) & set(carried))
    if shared:
        raise SystemExit(f"entries shared with the bundle's distributions: {shared}")
    if links.exists():
        shutil.rmtree(links)
    links.mkdir(parents=True)
    for entry in sorted(entries):
        (links / entry).symlink_to(site / entry)
    return wanted


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def make_venv(venv: Path, links: Path) -> Path:
    """A venv of this Python's base interpreter whose site-packages adds ``links``."""
    if venv.exists():
        shutil.rmtree(venv)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # addsitedir, so that .pth files among the links are processed as in a real site-packages.
    line = f"import site; site.addsitedir({str(links)!r})\n"
    (Path(purelib) / "gpu-image.pth").write_text(line, encoding="utf-8")
    return python


def check_absent(python: Path) -> list[str]:
    """Modules of ``ABSENT_MODULES`` the image-like interpreter can import (should be none)."""
    script = (
        "import importlib.util, sys\n"
        f"names = {list(ABSENT_MODULES)!r}\n"
        "print(' '.join(n for n in names if importlib.util.find_spec(n) is not None))\n"
    )
    found = subprocess.run(
        [str(python), "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),  # not the repository root, where `worker` is
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout.split()
    return found


def check_python312(python312: Path, wheels: Path, site: Path) -> int:
    """Install the 3.12 wheels with a 3.12 interpreter and import the torch-free chain."""
    if site.exists():
        shutil.rmtree(site)
    install = [str(python312), "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    install += ["--no-compile", "--disable-pip-version-check", "--target", str(site)]
    install += [str(path) for path in sorted(wheels.glob("*.whl"))]
    if subprocess.run(install, check=False).returncode != 0:
        return EXIT_SETUP
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    command = [str(python312), "-c", TORCHLESS_CHECK]
    return subprocess.run(command, env=env, cwd=tempfile.gettempdir(), check=False).returncode


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    tmp = Path(tempfile.gettempdir())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=tmp / "imgvenv")
    parser.add_argument("--links", type=Path, default=tmp / "imgvenv-image")
    parser.add_argument("--wheels", type=Path, default=tmp / "imgvenv-wheels")
    parser.add_argument("--site", type=Path, default=tmp / "imgvenv-site")
    parser.add_argument("--site312", type=Path, default=tmp / "imgvenv-site312")
    parser.add_argument("--out", type=Path, default=tmp / "imgvenv-out")
    parser.add_argument(
        "--python312", type=Path, default=None, help="a CPython 3.12 for the .whl/ check"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    print(f"1. image-like venv (Python {version}) in {args.venv}, torch stack linked from .venv")
    linked = link_image(args.links, version)
    print(f"   linked: {', '.join(linked)}")
    python = make_venv(args.venv, args.links)
    present = check_absent(python)
    if present:
        print(f"   importable without the bundle, but must not be: {present}", file=sys.stderr)
        return EXIT_SETUP
    print(f"   not importable there, as in the image: {', '.join(ABSENT_MODULES)}")
    print(f"2. the bundle for Python {version} in {args.wheels}")
    bundle = ["--dest", str(args.wheels), "--python-version", version, "--no-trace"]
    if gpu_bundle.main(bundle) != 0:
        return EXIT_SETUP
    print("3. bench/gpu-run.sh --dry-run with the image-like interpreter")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PYTHON=str(python),
        TAGSTREAM_GPU_WHEELS=str(args.wheels),
        TAGSTREAM_GPU_SITE=str(args.site),
        OUT=str(args.out),
    )
    if args.site.exists():
        shutil.rmtree(args.site)
    command = ["bash", str(REPO / "bench" / "gpu-run.sh"), "--dry-run"]
    code = subprocess.run(command, env=env, cwd=REPO, check=False).returncode
    print(f"   exit code {code}; results in {args.out / 'gpu'}")
    if code != 0:
        return code
    if args.python312 is not None:
        print(f"4. the Python 3.12 wheels of .whl/ with {args.python312}")
        code = check_python312(args.python312, gpu_bundle.DEFAULT_DEST, args.site312)
        print(f"   exit code {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
