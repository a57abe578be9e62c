"""Where and how a model runs: device and dtype resolution, model loading and its revision.

Shared by the NLI and embedding scorers. Loading never forces network access: a hub id that is
already in the local cache loads offline when ``HF_HUB_OFFLINE=1`` is set, exactly as
``from_pretrained`` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog
import torch
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from worker.config.settings import ModelSettings
from worker.errors import ScorerConfigError

ModelT = TypeVar("ModelT", bound=torch.nn.Module)
QUANTIZED_LINEAR = torch.ao.nn.quantized.dynamic.Linear

log = structlog.get_logger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Loaded in float32, then the linear layers are quantized (quantize_linear): CPU only.
INT8 = "int8"
# Reported for a local model directory that is not a git checkout.
LOCAL_REVISION = "local"
# Reported for a hub id given without a revision and not found in the local cache.
DEFAULT_BRANCH = "main"
# tokenizer.model_max_length at or above this means "not set" (transformers uses 1e30).
UNSET_MODEL_MAX_LENGTH = 1_000_000
# Used when neither tokenizer nor model declares a limit: the common encoder limit.
FALLBACK_MAX_LENGTH = 512
_DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
# A packed-refs line is "<commit> <ref name>".
PACKED_REF_FIELDS = 2
# How transformers words "this class cannot use SDPA" (message texts differ across versions).
_SDPA_REFUSAL = re.compile(r"sdpa|scaled_dot_product_attention|attn_implementation", re.IGNORECASE)


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises ``ValueError`` for a device that is not there, so a misconfigured worker stops at
    start-up instead of silently running on the CPU.
    """
    if not _DEVICE_SPEC.match(spec):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA GPUs that support it, float16 on other GPUs, float32 on CPU.

    ``int8`` loads in float32 (:func:`quantize_linear` then quantizes) and only on the CPU:
    raises :class:`~worker.errors.ScorerConfigError` naming the setting on any other device.
    """
    if spec == INT8:
        if device.type != "cpu":
            raise ScorerConfigError(
                f"TAGSTREAM_DTYPE=int8 runs on the CPU only, but the model would run on"
                f" {device}: set TAGSTREAM_DEVICE=cpu or another TAGSTREAM_DTYPE"
            )
        return torch.float32
    if spec != "auto":
        try:
            return DTYPES[spec]
        except KeyError:
            raise ValueError(
                f"dtype must be auto, {', '.join(DTYPES)} or {INT8}; got {spec!r}"
            ) from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def quantize_linear(model: ModelT) -> ModelT:
    """``model`` with every ``nn.Linear`` replaced by a dynamically quantized int8 one.

    Weights are stored in int8 once; activations are quantized per batch at run time, so no
    calibration data is needed. Embeddings and layer norms stay in float32. CPU only.
    """
    quantize: Callable[..., torch.nn.Module] = torch.ao.quantization.quantize_dynamic
    return cast(ModelT, quantize(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True))


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether :func:`quantize_linear` has replaced any of ``model``'s linear layers."""
    return any(isinstance(module, QUANTIZED_LINEAR) for module in model.modules())


def model_dtype_name(model: torch.nn.Module) -> str:
    """``"int8"`` for a quantized model, else its parameters' dtype (``"float32"``)."""
    if is_quantized(model):
        return INT8
    return dtype_name(next(model.parameters()).dtype)


def _git_commit(directory: Path) -> str | None:
    """The commit of a git checkout of a model (``git clone`` of a hub repo), if trivially read."""
    git = directory / ".git"
    head_file = git / "HEAD"
    if not head_file.is_file():
        return None
    head = head_file.read_text(encoding="utf-8").strip()
    if _COMMIT_HASH.match(head):
        return head
    if not head.startswith("ref: "):
        return None
    ref = head.removeprefix("ref: ")
    ref_file = git / ref
    if ref_file.is_file():
        commit = ref_file.read_text(encoding="utf-8").strip()
        return commit if _COMMIT_HASH.match(commit) else None
    packed = git / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == PACKED_REF_FIELDS and parts[1] == ref and _COMMIT_HASH.match(parts[0]):
                return parts[0]
    return None


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The snapshot commit that ``revision`` of ``repo_id`` resolves to in the local hub cache."""
    path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(path, str):
        return None
    snapshot = Path(path).parent.name
    return snapshot if _COMMIT_HASH.match(snapshot) else None


def is_commit(revision: str) -> bool:
    """Whether ``revision`` is a full commit hash (40 lowercase hex digits)."""
    return _COMMIT_HASH.match(revision) is not None


def resolve_revision(model: str, revision: str | None) -> str:
    """The revision to report for ``model`` (a local directory or a hub id).

    A directory: its git commit when it is a git checkout, else ``"local"``. A hub id: the
    snapshot commit ``revision`` resolves to in the local hub cache, else ``revision`` itself,
    else ``"main"``.
    """
    directory = Path(model).expanduser()
    if directory.is_dir():
        return _git_commit(directory) or LOCAL_REVISION
    return _cached_commit(model, revision) or revision or DEFAULT_BRANCH


def use_safetensors(settings: ModelSettings) -> bool | None:
    """``from_pretrained``'s ``use_safetensors``: safetensors only unless ``allow_pickle``.

    None: safetensors when present, else the pickle file; True: safetensors or fail.
    """
    return None if settings.allow_pickle else True


# How CUDA words the errors that poison the context for the rest of the process (a
# device-side assert, an illegal address, a failed launch, an uncorrectable memory error).
_STICKY_CUDA_ERROR = re.compile(
    r"device-side assert|illegal memory access|illegal address|illegal instruction"
    r"|unspecified launch failure|misaligned address|uncorrectable ECC|CUDA error: an illegal"
    r"|CUBLAS_STATUS_EXECUTION_FAILED|cudaErrorLaunchFailure",
    re.IGNORECASE,
)


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA error after which every later kernel fails too."""
    return isinstance(exc, RuntimeError) and bool(_STICKY_CUDA_ERROR.search(str(exc)))


def detached(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and chained exceptions, to be kept for later: a stored
    traceback keeps the frames of the failed forward pass, and with them its activations,
    alive (after an out-of-memory error, exactly the memory that is short)."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


def release_cached_memory(device: torch.device) -> None:
    """Hand the CUDA allocator's cached blocks back (after an out-of-memory error)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _load_model(
    settings: ModelSettings, revision: str | None, dtype: torch.dtype
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": settings.trust_remote_code,
        "use_safetensors": use_safetensors(settings),
        "dtype": dtype,
    }
    model: PreTrainedModel
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            settings.model, attn_implementation="sdpa", **kwargs
        )
    except OSError as exc:
        if settings.allow_pickle or "safetensors" not in str(exc):
            raise
        raise OSError(
            f"{exc} (only safetensors weights are loaded unless allow_pickle is set:"
            f" TAGSTREAM_ALLOW_PICKLE=true)"
        ) from exc
    except ValueError as exc:
        if not _SDPA_REFUSAL.search(str(exc)):
            raise
        log.info(
            "model class cannot use SDPA attention, using its default",
            model=settings.model,
            detail=str(exc).splitlines()[0],
        )
        model = AutoModelForSequenceClassification.from_pretrained(settings.model, **kwargs)
    return model


def load_sequence_classifier(
    settings: ModelSettings, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load model and tokenizer; return them with the resolved revision.

    ``settings.model`` is a local directory or a hub id (with ``settings.revision``). The
    resolved revision is the snapshot commit hash for a hub id, the directory's git commit
    or ``"local"`` for a directory. Weights must be safetensors unless ``allow_pickle``.
    The model is moved to ``device``, cast to ``dtype`` and put in eval mode; attention
    uses SDPA where the model class supports it. ``TAGSTREAM_DTYPE=int8`` then quantizes its
    linear layers (:func:`quantize_linear`).
    """
    is_local = Path(settings.model).expanduser().is_dir()
    model = _load_model(settings, None if is_local else settings.revision, dtype)
    resolved = resolve_revision(settings.model, settings.revision)
    if is_local:
        tokenizer_revision = None
    else:
        # Same snapshot as the weights, even if the branch moved while we were loading.
        tokenizer_revision = resolved if is_commit(resolved) else settings.revision
    tokenizer = AutoTokenizer.from_pretrained(
        settings.model,
        revision=tokenizer_revision,
        trust_remote_code=settings.trust_remote_code,
    )
    torch.nn.Module.to(model, device)
    model.train(False)
    if settings.dtype == INT8:
        model = quantize_linear(model)
    log.info(
        "model loaded",
        model=settings.model,
        revision=resolved,
        device=str(device),
        dtype=model_dtype_name(model),
        attention=getattr(model.config, "_attn_implementation", None),
    )
    return model, tokenizer, resolved
