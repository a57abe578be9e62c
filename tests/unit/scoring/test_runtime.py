"""Device and dtype resolution, and loading models safely (safetensors, offline, revisions)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModelForSequenceClassification

from worker.config.settings import ModelSettings
from worker.scoring.runtime import (
    DEFAULT_BRANCH,
    LOCAL_REVISION,
    load_sequence_classifier,
    resolve_device,
    resolve_dtype,
    resolve_revision,
)

REPO = Path(__file__).resolve().parents[3]
CPU = torch.device("cpu")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_resolve_device_auto_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="only 2 CUDA devices"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int4", CPU)
    assert resolve_dtype("int8", CPU) == torch.float32  # loaded so, then quantized


def test_local_model_loads_in_eval_mode_with_sdpa_where_supported(
    tiny_bart_dir: Path, tiny_deberta_dir: Path
) -> None:
    bart, _, revision = load_sequence_classifier(
        ModelSettings(model=str(tiny_bart_dir)), CPU, torch.bfloat16
    )
    assert revision == LOCAL_REVISION
    assert not bart.training and bart.dtype == torch.bfloat16
    assert bart.config._attn_implementation == "sdpa"
    # DeBERTa-v2 refuses SDPA: loaded with its default attention instead of failing.
    deberta, tokenizer, _ = load_sequence_classifier(
        ModelSettings(model=str(tiny_deberta_dir)), CPU, torch.float32
    )
    assert deberta.config._attn_implementation == "eager"
    assert tokenizer.model_max_length == 128


def test_pickle_weights_are_refused_unless_allowed(tiny_bart_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bart_dir, pickled)
    (pickled / "model.safetensors").unlink()
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bart_dir)
    torch.save(reference.state_dict(), pickled / "pytorch_model.bin")

    with pytest.raises(OSError, match="allow_pickle"):
        load_sequence_classifier(ModelSettings(model=str(pickled)), CPU, torch.float32)
    model, _, _ = load_sequence_classifier(
        ModelSettings(model=str(pickled), allow_pickle=True), CPU, torch.float32
    )
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())


def test_git_checkout_reports_its_commit(tiny_two_class_dir: Path, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(tiny_two_class_dir, checkout)
    (checkout / ".git" / "refs" / "heads").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (checkout / ".git" / "refs" / "heads" / "main").write_text(COMMIT + "\n")
    _, _, revision = load_sequence_classifier(
        ModelSettings(model=str(checkout)), CPU, torch.float32
    )
    assert revision == COMMIT


def test_resolve_revision_of_directories_and_hub_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert resolve_revision(str(plain), "ignored") == LOCAL_REVISION
    packed = tmp_path / "packed"
    (packed / ".git").mkdir(parents=True)
    (packed / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (packed / ".git" / "packed-refs").write_text(f"# pack-refs\n{COMMIT} refs/heads/main\n")
    assert resolve_revision(str(packed), None) == COMMIT
    detached = tmp_path / "detached"
    (detached / ".git").mkdir(parents=True)
    (detached / ".git" / "HEAD").write_text(COMMIT + "\n")
    assert resolve_revision(str(detached), None) == COMMIT

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert resolve_revision("acme/not-cached", None) == DEFAULT_BRANCH
    assert resolve_revision("acme/not-cached", "v2") == "v2"
    repo = hub / "models--acme--cached"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert resolve_revision("acme/cached", None) == COMMIT
    assert resolve_revision("acme/cached", "main") == COMMIT
    assert resolve_revision("acme/cached", COMMIT) == COMMIT
    assert resolve_revision("acme/cached", "v2") == "v2"  # a ref the cache does not know


_LOAD_FROM_HUB = """
import torch
from worker.scoring.runtime import load_sequence_classifier
from worker.config.settings import ModelSettings
for revision in (None, "main", "{commit}"):
    settings = ModelSettings(model="acme/tiny-nli", revision=revision)
    _, _, resolved = load_sequence_classifier(settings, torch.device("cpu"), torch.float32)
    print("RESOLVED", resolved)
"""


def test_cached_hub_model_loads_offline_and_resolves_its_commit(
    tiny_bart_dir: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "hub" / "models--acme--tiny-nli"
    shutil.copytree(tiny_bart_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_FROM_HUB.format(commit=COMMIT)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = [
        line.split()[1] for line in result.stdout.splitlines() if line.startswith("RESOLVED")
    ]
    assert resolved == [COMMIT] * 3
