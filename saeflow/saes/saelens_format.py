"""The SAELens disk format, both ways: ``cfg.json`` + ``sae_weights.safetensors``.

:func:`save_sae` writes the SAELens layout that ``sae_lens.SAE.load_from_disk`` reads;
:func:`load_sae` reads it back (also SAELens-written standard / TopK / JumpReLU SAEs). Every file
is written with :func:`saeflow.artifacts.write_atomic`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saeflow.artifacts import COMPLETE_MARKER, sha256_file, write_atomic, write_json_atomic
from saeflow.saes.base import BaseSAE, without_init
from saeflow.saes.config import SAEConfig
from saeflow.saes.errors import SAEFormatError
from saeflow.saes.registry import REGISTRY

__all__ = ["save_sae", "load_sae", "saved_hook", "SAEFormatError", "fold_b_dec_into_b_enc", "SAE_CFG_FILENAME", "SAE_WEIGHTS_FILENAME",
           "SAELENS_FORMAT_VERSION", "SAEFLOW_FORMAT_VERSION", "FOREIGN_ARCHITECTURES"]

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
#: The training summary saeflow writes into a finished SAE folder: the weights' size and SHA-256
#: (:func:`saeflow.checkpoint.write_done`), checked by :func:`load_sae`.
DONE_FILE = "training_summary.json"
#: SAELens version whose on-disk format :func:`save_sae` writes (recorded as ``metadata.sae_lens_version``
#: so SAELens >= 6 skips its pre-6.0 config conversion).
SAELENS_FORMAT_VERSION = "6.54.12"
#: Version of the ``saeflow`` block inside ``cfg.json``.
SAEFLOW_FORMAT_VERSION = 1


def _check_jsonable(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable (plain str/int/float/bool/list/dict): {exc}") from exc


def save_sae(sae: BaseSAE, out_dir: str | Path, cfg_extra: dict[str, Any] | None = None,
             training_info: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) into ``out_dir``.

    ``cfg_extra`` goes into ``cfg.json``'s ``metadata`` (SAELens reads e.g. ``model_name``,
    ``hook_name``, ``context_size``, ``prepend_bos`` from there). ``training_info`` is stored in
    our own ``saeflow`` block next to the full :class:`SAEConfig`. The SAE must already work on raw
    activations (activation scaling folded in); decoder norms are folded on save (TopK with
    rescaling), without modifying ``sae``. Each file is written atomically.

    ``cfg.json``'s ``architecture`` is the SAELens inference architecture
    (:attr:`BaseSAE.saved_architecture`: ``relu`` -> ``standard``, ``batchtopk`` / ``matryoshka``
    -> ``jumprelu``); ``metadata.training_architecture`` names the SAELens training architecture.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    cfg_extra = dict(cfg_extra or {})
    _check_jsonable("cfg_extra", cfg_extra)
    _check_jsonable("training_info", training_info or {})
    tensors = sae.inference_tensors()
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"refusing to save an SAE whose {name} holds NaN/inf values")
    cfg: dict[str, Any] = {
        "architecture": sae.saved_architecture or sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.sae_lens_cfg_fields(),
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "training_architecture": sae.sae_lens_training_architecture or sae.architecture,
            **cfg_extra,
        },
        "saeflow": {
            "format_version": SAEFLOW_FORMAT_VERSION,
            "sae_config": sae.cfg.model_dump(mode="json"),
            "training_info": training_info or {},
        },
    }
    write_atomic(out_dir / SAE_WEIGHTS_FILENAME, lambda tmp: save_file(tensors, str(tmp)))
    write_json_atomic(out_dir / SAE_CFG_FILENAME, cfg)
    return out_dir


#: SAELens inference architecture -> registered architecture that loads a foreign (SAELens-written,
#: no ``saeflow`` block) SAE of that kind.
FOREIGN_ARCHITECTURES = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}


def saved_hook(path: str | Path) -> str | None:
    """The hook an SAE folder says it reads (``metadata.hook_name`` of its ``cfg.json``), if recorded."""
    cfg_file = Path(path) / SAE_CFG_FILENAME
    if not cfg_file.exists():
        return None
    return (json.loads(cfg_file.read_text()).get("metadata") or {}).get("hook_name")


def fold_b_dec_into_b_enc(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """The encoder bias ``b_enc + b_dec @ W_enc`` (computed in float64) that makes saeflow's
    ``(x - b_dec) @ W_enc + b'`` equal SAELens' ``x @ W_enc + b_enc`` of an SAE saved with
    ``apply_b_dec_to_input=false``; the decoder (``f @ W_dec + b_dec``) is unchanged."""
    return (b_enc.double() + b_dec.double() @ W_enc.double()).to(b_enc.dtype)


def _fix_hint(path: Path) -> str:
    """What to do about a damaged SAE folder: a finished artifact (``_COMPLETE.json`` in it or in
    its parent, e.g. a meta-SAE) is never rebuilt by a re-run on its own, so the fix names it."""
    for folder in (path, path.parent):
        if (folder / COMPLETE_MARKER).is_file():
            return (f"the finished artifact {folder} was damaged after it was written: delete {folder} and "
                    "re-run the pipeline, which rebuilds it")
    return "re-run the training stage to rebuild it"


def _check_recorded_weights(path: Path, w_path: Path, hint: str) -> None:
    """A folder saeflow trained records the weights' size and SHA-256 in its training summary
    (:data:`DONE_FILE`): weights that differ were damaged after training (a
    truncated or overwritten file), which must fail, never load as other numbers."""
    try:
        done = json.loads((path / DONE_FILE).read_text())
    except (OSError, ValueError):
        return
    size, digest = done.get("weights_bytes"), done.get("weights_sha256")
    if size is None or digest is None:
        return
    have = w_path.stat().st_size
    if have != size:
        why = f"{have} bytes, {size} recorded in {DONE_FILE}"
    elif sha256_file(w_path) != digest:
        why = f"its SHA-256 differs from the one recorded in {DONE_FILE}"
    else:
        return
    raise SAEFormatError(f"{w_path} is unreadable or corrupt: it is not the file training wrote ({why}); {hint}")


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load an SAE folder written by :func:`save_sae` (or a SAELens standard / TopK / JumpReLU SAE).

    A folder with a ``saeflow`` block comes back as the architecture that was trained (e.g. a
    ``batchtopk`` SAE, saved as SAELens ``jumprelu``, loads as :class:`BatchTopKSAE` with its
    threshold); a foreign folder as :data:`FOREIGN_ARCHITECTURES` says. Raises
    :class:`SAEFormatError` naming the file when the folder, ``cfg.json`` or the weights are
    missing, unreadable, corrupt or of the wrong shape.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    hint = _fix_hint(path)
    if not path.is_dir():
        raise SAEFormatError(f"SAE folder {path} does not exist; {hint}")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SAEFormatError(f"SAE folder {path} has no {p.name}: it is partial; {hint}")
    try:
        raw = json.loads(cfg_path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("top level is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{cfg_path} is not valid JSON ({exc}): the file is corrupt; {hint}") from exc

    arch = raw.get("architecture")
    saved_kinds = {c.saved_architecture for c in REGISTRY.values()} | set(FOREIGN_ARCHITECTURES)
    if arch not in saved_kinds:
        raise SAEFormatError(
            f"{cfg_path}: architecture {arch!r} is not supported; registered: {', '.join(sorted(REGISTRY))} "
            f"(loadable cfg.json architectures: {', '.join(sorted(saved_kinds))})"
        )
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
        block = raw.get("saeflow")
        if isinstance(block, dict) and "sae_config" in block:
            sae_cfg = SAEConfig.model_validate(block["sae_config"])
            cls = REGISTRY[sae_cfg.architecture]
        else:
            cls = REGISTRY[FOREIGN_ARCHITECTURES[str(arch)]]
            sae_cfg = cls.config_from_sae_lens(raw)
    except SAEFormatError:
        raise
    except Exception as exc:
        raise SAEFormatError(f"{cfg_path} lacks or has invalid fields ({exc}); {hint}") from exc
    if cls.saved_architecture != arch or sae_cfg.width != d_sae:
        raise SAEFormatError(
            f"{cfg_path} is inconsistent: architecture={arch!r}, d_sae={d_sae} but the saeflow block says "
            f"architecture={sae_cfg.architecture!r} (saved as {cls.saved_architecture!r}), width={sae_cfg.width}; {hint}"
        )
    if raw.get("normalize_activations", "none") != "none":
        raise SAEFormatError(
            f"{cfg_path} has normalize_activations={raw['normalize_activations']!r}; only SAEs that work on raw "
            "activations (normalize_activations='none', the scaling folded into the weights) can be loaded: "
            "fold a constant scaling factor into the weights first (SAELens: fold_activation_norm_scaling_factor); "
            "per-input normalisations (constant_norm_rescale, layer_norm) are not supported"
        )
    # SAELens' apply_b_dec_to_input=false (Gemma Scope): h = x @ W_enc + b_enc. saeflow's form is
    # h = (x - b_dec) @ W_enc + b_enc', the same function when b_enc' = b_enc + b_dec @ W_enc (folded below)
    fold_b_dec = not raw.get("apply_b_dec_to_input", True)
    if fold_b_dec and isinstance(raw.get("saeflow"), dict):
        raise SAEFormatError(f"{cfg_path} has apply_b_dec_to_input=false and a saeflow block; saeflow never writes "
                             f"that combination, so the file was edited; {hint}")
    if raw.get("reshape_activations", "none") != "none":
        raise SAEFormatError(f"{cfg_path} has reshape_activations={raw['reshape_activations']!r}; only 'none' is supported")

    _check_recorded_weights(path, w_path, hint)
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEFormatError(f"{w_path} is unreadable or corrupt ({exc}); {hint}") from exc
    if "log_threshold" in state and "threshold" not in state:  # older SAELens JumpReLU checkpoints
        state["threshold"] = state.pop("log_threshold").float().exp()
    expected = cls.inference_tensor_shapes(d_in, d_sae)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise SAEFormatError(
            f"{w_path} holds tensors {sorted(state)}; expected exactly {list(expected)} "
            f"(missing {missing}, unexpected {extra}); {hint}"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise SAEFormatError(
                f"{w_path}: {name} has shape {tuple(state[name].shape)} but cfg.json (d_in={d_in}, "
                f"d_sae={d_sae}) needs {shape}; the folder is inconsistent; {hint}"
            )
    if fold_b_dec:
        state["b_enc"] = fold_b_dec_into_b_enc(state["W_enc"], state["b_enc"], state["b_dec"])
    with without_init():  # the weights are the file's: no random draw, held once
        sae = cls(sae_cfg, d_in, seed=0)
    try:
        sae.load_inference_tensors(state, take=True)
    except ValueError as exc:
        raise SAEFormatError(f"{w_path}: {exc}; {hint}") from exc
    return sae.to(device)
