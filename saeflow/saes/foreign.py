"""Checkpoints of other SAE libraries, converted once into the SAELens layout (issue #27).

Each converter reads a checkpoint folder as its library saves it and writes a plain SAELens
folder (``cfg.json`` + ``sae_weights.safetensors``, no ``saeflow`` block: what
``sae_lens.SAE.load_from_disk`` and :func:`saeflow.saes.load_sae` read) computing the same
latents and reconstruction:

- EleutherAI sparsify (``cfg.json`` + ``sae.safetensors``, one folder per hookpoint):
  ``f = topk(relu(encoder(x - b_dec)))``, ``x_hat = f @ W_dec + b_dec`` -> SAELens ``topk`` with
  ``rescale_acts_by_decoder_norm: false`` (ReLU before or after the top-k selection gives the same
  dense latents). Transcoders, skip connections and ``groupmax`` are refused.
- dictionary_learning (``ae.pt`` + ``config.json``): see :func:`convert_dictionary_learning`.

A checkpoint is untrusted input: shapes are read from the file headers and checked against its
config before a tensor is materialised, pickles are opened with ``weights_only=True`` (a pickle
that would run code is refused), and every value must be finite.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from saeflow.artifacts import write_atomic, write_json_atomic
from saeflow.saes.errors import SAEFormatError

__all__ = ["FORMATS", "convert", "convert_sparsify", "checkpoint_files", "hook_from_module_name"]

#: ``import_saes`` ``format`` -> the files its checkpoint folder holds.
FORMATS: dict[str, tuple[str, ...]] = {
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("config.json", "ae.pt"),
}

#: Largest SAE a checkpoint may declare (latents x d_in): 1M latents x 16k wide, far above any
#: published SAE; a larger declaration is a corrupt or crafted file, refused before allocating.
MAX_ELEMENTS = (1 << 20) * (1 << 14)

_RESID_MODULE = re.compile(r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)$")


def checkpoint_files(folder: str | Path, fmt: str) -> list[Path]:
    """The files of a ``fmt`` checkpoint in ``folder``; :class:`SAEFormatError` names what is missing."""
    if fmt not in FORMATS:
        raise SAEFormatError(f"unknown SAE checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    folder = Path(folder)
    files = [folder / n for n in FORMATS[fmt]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SAEFormatError(f"{folder} is not a {fmt} checkpoint folder (missing {', '.join(missing)}); point "
                             f"import_saes at a folder holding {' and '.join(FORMATS[fmt])}")
    return files


def hook_from_module_name(name: str) -> str | None:
    """The TransformerLens hook of a Hugging Face module whose output is the residual stream
    after block N (``layers.6``, ``model.layers.6``, ``gpt_neox.layers.6``, ``transformer.h.6``)."""
    m = _RESID_MODULE.match(name)
    return f"blocks.{m[1]}.hook_resid_post" if m else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: the top level is not an object")
    return data


def _positive_int(value: Any, what: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEFormatError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def _check_size(d_in: int, d_sae: int, where: Path) -> None:
    if d_in * d_sae > MAX_ELEMENTS:
        raise SAEFormatError(f"{where} declares {d_sae} latents x d_in {d_in}, more than any SAE this reads "
                             f"({MAX_ELEMENTS} weights per matrix): the file is corrupt or not an SAE")


def _read_safetensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors ``expected`` names, as float32, after checking every name and shape in the header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(expected):
                raise SAEFormatError(f"{path} holds tensors {sorted(keys)}; expected {sorted(expected)}")
            for name, shape in expected.items():
                have = tuple(f.get_slice(name).get_shape())
                if have != shape:
                    raise SAEFormatError(f"{path}: {name} has shape {have}, the config says {shape}")
            out = {name: f.get_tensor(name).to(torch.float32) for name in expected}
    except SafetensorError as exc:
        raise SAEFormatError(f"{path} is unreadable or corrupt ({exc})") from exc
    for name, t in out.items():
        if not torch.isfinite(t).all():
            raise SAEFormatError(f"{path}: {name} holds NaN or inf values")
    return out


def _write_saelens(out_dir: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_atomic(out_dir / "sae_weights.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json_atomic(out_dir / "cfg.json", cfg)


def _base_cfg(architecture: str, d_in: int, d_sae: int, hook: str | None, model: str | None,
              source: dict[str, Any]) -> dict[str, Any]:
    return {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": hook, "model_name": model, "converted_from": source}}


def convert_sparsify(folder: str | Path, out_dir: str | Path, hook: str | None = None) -> dict[str, Any]:
    """Convert an EleutherAI sparsify SAE folder (``cfg.json`` + ``sae.safetensors``) into a SAELens
    ``topk`` folder at ``out_dir``. ``hook``: the TransformerLens hook it reads; default from the
    folder's name (sparsify names it after the hookpoint, e.g. ``layers.6``). The model is read from
    the training run's ``config.json`` one folder up, when present. Returns the written ``cfg.json``."""
    folder, out_dir = Path(folder), Path(out_dir)
    cfg_path, w_path = checkpoint_files(folder, "sparsify")
    raw = _read_json(cfg_path)
    if raw.get("transcode") or raw.get("skip_connection"):
        raise SAEFormatError(f"{cfg_path}: a sparsify transcoder / skip-connection model is not an SAE of one "
                             "activation; only plain SAEs (transcode: false, skip_connection: false) can be imported")
    if raw.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{cfg_path}: activation {raw.get('activation')!r} is not supported (only topk)")
    d_in = _positive_int(raw.get("d_in"), "d_in", cfg_path)
    n = raw.get("num_latents") or d_in * _positive_int(raw.get("expansion_factor"), "expansion_factor", cfg_path)
    n = _positive_int(n, "num_latents", cfg_path)
    k = _positive_int(raw.get("k"), "k", cfg_path)
    _check_size(d_in, n, cfg_path)
    if k > n:
        raise SAEFormatError(f"{cfg_path}: k={k} exceeds the {n} latents")
    t = _read_safetensors(w_path, {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in),
                                   "b_dec": (d_in,)})
    hook = hook or hook_from_module_name(folder.name)
    if hook is None:
        raise SAEFormatError(f"{folder}: cannot tell which hook this sparsify SAE reads from its folder name "
                             f"{folder.name!r}; give it in the import_saes entry (hook: blocks.N.hook_resid_post)")
    model = None
    run_cfg = folder.parent / "config.json"
    if run_cfg.is_file():
        try:
            model = json.loads(run_cfg.read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            model = None
    cfg = _base_cfg("topk", d_in, n, hook, model if isinstance(model, str) else None,
                    {"format": "sparsify", "hookpoint": folder.name})
    cfg.update({"k": k, "rescale_acts_by_decoder_norm": False})
    _write_saelens(out_dir, cfg, {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
                                  "b_dec": t["b_dec"]})
    return cfg


def convert(fmt: str, folder: str | Path, out_dir: str | Path, hook: str | None = None) -> dict[str, Any]:
    """Convert a ``fmt`` checkpoint folder (``sparsify`` or ``dictionary_learning``) to SAELens layout."""
    if fmt == "sparsify":
        return convert_sparsify(folder, out_dir, hook)
    if fmt == "dictionary_learning":
        return convert_dictionary_learning(folder, out_dir, hook)
    raise SAEFormatError(f"no converter for format {fmt!r}; known: sparsify, dictionary_learning")


def convert_dictionary_learning(folder: str | Path, out_dir: str | Path, hook: str | None = None) -> dict[str, Any]:
    """Placeholder until the dictionary_learning classes are pinned down (see module docstring)."""
    raise SAEFormatError("dictionary_learning checkpoints are not supported yet")
