"""Find a model's files and read only the tensors a caller needs from its safetensors checkpoint."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from corolla.core.errors import CorollaError
from corolla.models.family import family_for
from corolla.models.embedded import (
    EMBEDDED_DHT_PREFIX,
    EMBEDDED_MODEL_NAME,
    MODEL_INFO_FILE,
    embedded_model_dir,
)

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

# What resolve_model lets snapshot_download fetch: config, tokenizer and safetensors weights, nothing else.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    INDEX_FILE_NAME,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
]


def is_embedded_name(name_or_path: str | Path | None) -> bool:
    """Whether ``name_or_path`` names the embedded model (``None`` or ``"smollm2"``, in any case)."""
    return name_or_path is None or (isinstance(name_or_path, str) and name_or_path.lower() == EMBEDDED_MODEL_NAME)


def _looks_like_local_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def resolve_model(name_or_path: str | None, what: str = "model") -> Path:
    """Return the local directory holding the model's config, tokenizer and safetensors weights (``what``: what the
    errors call it, e.g. "adapter").

    ``None`` or ``"smollm2"`` gives the embedded model (converted on first use); an existing directory is
    returned as is; anything else is taken as a Hugging Face hub id, looked up in the local hub cache first
    and downloaded only if missing there.
    """
    if is_embedded_name(name_or_path):
        return embedded_model_dir()
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CorollaError(f"{what} path {text!r} is a file; give the directory holding its config and weights")
    if _looks_like_local_path(text):
        raise CorollaError(f"{what} directory {text!r} does not exist")
    return _snapshot_from_hub(text)


def _snapshot_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as offline_error:  # not in the local cache: try the network next
        cache_miss = offline_error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as online_error:
        raise CorollaError(
            f"cannot find model {repo_id!r}: it is not the embedded model ({EMBEDDED_MODEL_NAME!r}), not a local "
            f"directory, not in the local Hugging Face cache ({type(cache_miss).__name__}: {cache_miss}) and could "
            f"not be downloaded from the hub ({type(online_error).__name__}: {online_error})"
        ) from online_error


def load_config(path: str | Path) -> transformers.PretrainedConfig:
    """Load the model's ``config.json`` with ``AutoConfig``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CorollaError(f"no config.json in model directory {path}")
    return transformers.AutoConfig.from_pretrained(str(path))


def _files_to_names(path: Path) -> dict[Path, list[str] | None]:
    """Map each checkpoint file to the tensor names it holds (None: all of them, read from the file itself)."""
    index_file = path / INDEX_FILE_NAME
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        files: dict[Path, list[str] | None] = {}
        for name, file_name in weight_map.items():
            files.setdefault(path / file_name, []).append(name)
        return files
    single_file = path / SINGLE_FILE_NAME
    if single_file.is_file():
        return {single_file: None}
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise CorollaError(
        f"no {SINGLE_FILE_NAME} or {INDEX_FILE_NAME} in {path}: only safetensors checkpoints are supported "
        f"(the directory holds: {', '.join(found) or 'nothing'})"
    )


def read_tensors(
    path: str | Path,
    wanted: Callable[[str], bool],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read only the tensors whose names pass ``wanted``, opening only the shard files that hold them.

    Floating-point tensors are cast to ``dtype`` when it is given; integer tensors keep their dtype.
    Memory grows with what is read, not with the size of the checkpoint.
    """
    tensors: dict[str, torch.Tensor] = {}
    for file, names in _files_to_names(Path(path)).items():
        if names is not None:
            names = [name for name in names if wanted(name)]
            if not names:
                continue
        with safe_open(str(file), framework="pt", device=str(device)) as reader:
            selected = names if names is not None else [name for name in reader.keys() if wanted(name)]
            for name in selected:
                tensor = reader.get_tensor(name)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[name] = tensor
    return tensors


def tensor_shapes(path: str | Path, wanted: Callable[[str], bool]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors whose names pass ``wanted``, from the shards' headers (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, names in _files_to_names(Path(path)).items():
        with safe_open(str(file), framework="pt") as reader:
            for name in (names if names is not None else reader.keys()):
                if wanted(name):
                    shapes[name] = tuple(reader.get_slice(name).get_shape())
    return shapes


def config_digest(config) -> str:
    """A short digest of what makes two checkpoints' blocks interchangeable: architecture and shapes. Servers
    announce it; a server or client whose checkpoint disagrees with the swarm's is told so."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "head_dim", "sliding_window", "layer_types", "num_local_experts",
            "n_layer", "n_head", "word_embed_proj_dim", "alibi", "new_decoder_architecture", "rotary_pct")
    fields = {key: getattr(text, key, None) for key in keys}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sanitize_prefix(name: str) -> str:
    prefix = re.sub(r"[^a-z0-9._-]", "-", name.lower()).strip("-")
    if not prefix:
        raise CorollaError(f"cannot derive a DHT name from model {name!r}")
    return prefix


def model_dht_prefix(path_or_name: str | Path | None, config=None) -> str:
    """A short stable name for the model, used as the prefix of its DHT keys.

    The embedded model always gives ``"smollm2-135m-instruct"``; a directory gives its name (or the repository
    name for a hub cache snapshot); a hub id gives its last component. Lower case, only ``[a-z0-9._-]``. With the
    model's ``config``, its family's rule (``ModelFamily.dht_name``) then applies, e.g. Llama's drops the ``-hf`` of
    Hugging Face conversions so that ``Llama-2-7b`` and ``Llama-2-7b-hf`` name one swarm.
    """
    if is_embedded_name(path_or_name):
        return EMBEDDED_DHT_PREFIX
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        path = path.resolve()
        info_file = path / MODEL_INFO_FILE
        if info_file.is_file():
            return json.loads(info_file.read_text())["dht_prefix"]
        snapshots, repo_dir = path.parent, path.parent.parent
        if snapshots.name == "snapshots" and repo_dir.name.startswith("models--"):
            name = _sanitize_prefix(repo_dir.name.split("--")[-1])
        else:
            name = _sanitize_prefix(path.name)
    else:
        name = _sanitize_prefix(str(path_or_name).rstrip("/").split("/")[-1])
    if config is not None:
        rule = family_for(config).dht_name
        if rule is not None:
            name = _sanitize_prefix(rule(name))
    return name
