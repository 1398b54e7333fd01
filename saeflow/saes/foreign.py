"""Checkpoints of other SAE libraries, converted once into the SAELens layout (issue #27).

Each converter reads a checkpoint folder as its library saves it and writes a plain SAELens
folder (``cfg.json`` + ``sae_weights.safetensors``, no ``saeflow`` block: what
``sae_lens.SAE.load_from_disk`` and :func:`saeflow.saes.load_sae` read) computing the same
latents and reconstruction:

- EleutherAI sparsify (``cfg.json`` + ``sae.safetensors``, one folder per hookpoint):
  ``f = topk(relu(encoder(x - b_dec)))``, ``x_hat = f @ W_dec + b_dec`` -> SAELens ``topk`` with
  ``rescale_acts_by_decoder_norm: false`` (ReLU before or after the top-k selection gives the same
  dense latents). Transcoders, skip connections and ``groupmax`` are refused.
- dictionary_learning (``ae.pt`` + ``config.json``; its ``AutoEncoder``, ``AutoEncoderTopK``,
  ``BatchTopKSAE``, ``MatryoshkaBatchTopKSAE`` and ``JumpReluAutoEncoder``): see
  :func:`convert_dictionary_learning`.

A checkpoint is untrusted input: shapes are read from the file headers and checked against its
config before a tensor is materialised, pickles are opened with ``weights_only=True`` (a pickle
that would run code is refused), and every value must be finite.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from saeflow.artifacts import write_atomic, write_json_atomic
from saeflow.saes.errors import SAEFormatError

__all__ = ["FORMATS", "convert", "convert_sparsify", "convert_dictionary_learning", "checkpoint_files",
           "hook_from_module_name"]

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
        raise SAEFormatError(f"{folder} is not an SAE folder in {fmt} layout (missing {', '.join(missing)}); point "
                             f"import_saes at a folder holding {' and '.join(FORMATS[fmt])} (or set format: "
                             f"{' / '.join(f for f in FORMATS if f != fmt)})")
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


#: dictionary_learning ``dict_class`` -> (state_dict key -> shape in terms of D = activation_dim,
#: F = dict_size; ``()`` = scalar). Orientation as the package stores it: ``encoder.weight`` /
#: ``decoder.weight`` are ``nn.Linear`` weights (out x in), ``W_enc`` is [D, F], ``W_dec`` [F, D].
_DL_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "AutoEncoder": {"bias": ("D",), "encoder.weight": ("F", "D"), "encoder.bias": ("F",), "decoder.weight": ("D", "F")},
    "AutoEncoderTopK": {"b_dec": ("D",), "k": (), "threshold": (), "decoder.weight": ("D", "F"),
                        "encoder.weight": ("F", "D"), "encoder.bias": ("F",)},
    "BatchTopKSAE": {"b_dec": ("D",), "k": (), "threshold": (), "decoder.weight": ("D", "F"),
                     "encoder.weight": ("F", "D"), "encoder.bias": ("F",)},
    "MatryoshkaBatchTopKSAE": {"W_enc": ("D", "F"), "b_enc": ("F",), "W_dec": ("F", "D"), "b_dec": ("D",), "k": (),
                               "threshold": (), "group_sizes": ("G",)},
    "JumpReluAutoEncoder": {"W_enc": ("D", "F"), "b_enc": ("F",), "W_dec": ("F", "D"), "b_dec": ("D",),
                            "threshold": ("F",)},
}
_DL_HOOK = re.compile(r"^resid_post_layer_(\d+)$")


def _load_pickle(path: Path, expect_bytes: int) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` of an untrusted checkpoint: its size is checked
    against what the config declares first, it is memory-mapped (nothing allocated for it), and
    a pickle holding anything but tensors and plain containers is refused."""
    import pickle

    size = path.stat().st_size
    if size > 2 * expect_bytes + (1 << 20):
        raise SAEFormatError(f"{path} is {size} bytes, far more than the {expect_bytes} its config.json declares: "
                             "the file is corrupt or not this SAE")
    try:  # torch.save's zip format is memory-mapped; an old-style pickle is read (size checked above)
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise SAEFormatError(f"{path} was refused: it is not a plain tensor checkpoint (loading it would run code or "
                             f"build objects other than tensors; torch.load(weights_only=True) says: "
                             f"{str(exc).splitlines()[0]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise SAEFormatError(f"{path} is unreadable or corrupt ({exc})") from None
    if isinstance(state, dict) and "ae" in state and "optimizer" in state:
        raise SAEFormatError(f"{path} is a mid-training backup (step {state.get('step')!r}) of an interrupted run, not "
                             "a finished SAE: import the ae.pt a finished run saves")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SAEFormatError(f"{path} does not hold a state dict of tensors")
    return state


def convert_dictionary_learning(folder: str | Path, out_dir: str | Path, hook: str | None = None) -> dict[str, Any]:
    """Convert a dictionary_learning run folder (``ae.pt`` + ``config.json``, as its ``trainSAE``
    saves ``trainer_<i>/``) into a SAELens folder at ``out_dir`` giving what that package's own
    loader (``dictionary_learning.utils.load_dictionary``) computes:

    - ``AutoEncoder`` (standard ReLU): SAELens ``standard``; the decoder columns are scaled to unit
      norm and the encoder rows and bias by the same norms, as the package's loader does by default;
    - ``AutoEncoderTopK``: ``topk`` (ReLU then top-k per row; its ``threshold`` buffer is unused at
      inference, as in the package);
    - ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: ``jumprelu`` with every latent's threshold the
      saved global one (the package's inference rule ``a * (a > θ)``, ``a = relu(pre)``); a negative
      θ (a run saved before its threshold was set) makes it a plain ReLU SAE, noted in the metadata;
    - ``JumpReluAutoEncoder``: ``jumprelu`` with ``apply_b_dec_to_input: false`` (the package does not
      subtract ``b_dec`` from the input), per-latent thresholds.

    ``hook``: default from ``submodule_name`` (``resid_post_layer_N``) or a Hugging Face module name;
    the model is ``lm_name``. Returns the written ``cfg.json``."""
    folder, out_dir = Path(folder), Path(out_dir)
    cfg_path, w_path = checkpoint_files(folder, "dictionary_learning")
    raw = _read_json(cfg_path)
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        raise SAEFormatError(f"{cfg_path} has no 'trainer' section: not a dictionary_learning run's config.json")
    cls = trainer.get("dict_class")
    if cls not in _DL_KEYS:
        raise SAEFormatError(f"{cfg_path}: dict_class {cls!r} is not supported; supported: {', '.join(_DL_KEYS)}")
    D = _positive_int(trainer.get("activation_dim"), "trainer.activation_dim", cfg_path)
    F = _positive_int(trainer.get("dict_size"), "trainer.dict_size", cfg_path)
    _check_size(D, F, cfg_path)
    state = _load_pickle(w_path, expect_bytes=4 * (2 * D * F + 2 * F + 2 * D))
    spec = _DL_KEYS[cls]
    if set(state) != set(spec):
        raise SAEFormatError(f"{w_path} holds {sorted(state)}; a {cls} holds {sorted(spec)}")
    dims = {"D": D, "F": F}
    for name, want in spec.items():
        have = tuple(state[name].shape)
        if "G" in want:
            continue
        if have != tuple(dims[d] for d in want):
            raise SAEFormatError(f"{w_path}: {name} has shape {have}, config.json (activation_dim {D}, dict_size {F}) "
                                 f"says {tuple(dims[d] for d in want)}")
    t = {name: v.to(torch.float32) for name, v in state.items() if v.is_floating_point()}
    for name, v in t.items():
        if not torch.isfinite(v).all():
            raise SAEFormatError(f"{w_path}: {name} holds NaN or inf values")

    note = None
    if cls == "AutoEncoder":
        n = t["decoder.weight"].norm(dim=0).clamp_min(1e-12)  # [F]: the package's loader normalises
        arch, extra = "standard", {}
        tensors = {"W_enc": (t["encoder.weight"] * n[:, None]).T, "b_enc": t["encoder.bias"] * n,
                   "W_dec": (t["decoder.weight"] / n).T, "b_dec": t["bias"]}
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        tensors = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T,
                   "b_dec": t["b_dec"]}
    else:
        tensors = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if cls == "AutoEncoderTopK":
        k = int(state["k"])
        if not 1 <= k <= F:
            raise SAEFormatError(f"{w_path}: k={k} is not between 1 and dict_size {F}")
        arch, extra = "topk", {"k": k, "rescale_acts_by_decoder_norm": False}
    elif cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        theta = float(state["threshold"])
        if theta < 0:
            note = (f"saved threshold {theta:g} < 0 (the run stopped before its threshold was set): at inference "
                    "it is a plain ReLU SAE, as in dictionary_learning")
        arch, extra = "jumprelu", {}
        tensors["threshold"] = torch.full((F,), max(theta, 0.0))
    elif cls == "JumpReluAutoEncoder":
        arch, extra = "jumprelu", {"apply_b_dec_to_input": False}
        tensors["threshold"] = t["threshold"]

    sub = str(trainer.get("submodule_name") or "")
    m = _DL_HOOK.match(sub)
    hook = hook or (f"blocks.{m[1]}.hook_resid_post" if m else hook_from_module_name(sub))
    if hook is None:
        raise SAEFormatError(f"{folder}: cannot tell which hook this dictionary_learning SAE reads from its "
                             f"submodule_name {sub!r}; give it in the import_saes entry (hook: blocks.N.hook_resid_post)")
    model = trainer.get("lm_name")
    source: dict[str, Any] = {"format": "dictionary_learning", "dict_class": cls,
                              "trainer_class": trainer.get("trainer_class")}
    if note:
        source["note"] = note
    cfg = _base_cfg(arch, D, F, hook, model if isinstance(model, str) else None, source)
    cfg.update(extra)
    _write_saelens(out_dir, cfg, tensors)
    return cfg
