"""Make the dictionary_learning checkpoint fixtures in this folder.

Run with an interpreter that has the ``dictionary-learning`` package (PyPI 0.1.0) installed,
NOT the project's venv (that package pins nnsight<0.4); see README.md here:

    /work/dlvenv/bin/python tests/data/dictionary_learning/make_fixtures.py

For each dictionary class it:

1. runs the package's own ``dictionary_learning.training.trainSAE`` with one trainer of the
   matching trainer class and ``steps=0``, so the package itself writes ``config.json`` (at
   start-up) and ``ae.pt`` (the final ``{k: v.cpu() for k, v in ae.state_dict().items()}``).
   The only stand-ins are (a) the activation source: a tiny iterable with the same ``config``
   keys as ``ActivationBuffer.config`` (trainSAE stores that under "buffer"), and (b) the
   ``dict_class`` handed to the trainer: a subclass of the real class that only records its
   instances, so that the weights can be overwritten with seeded random values before trainSAE
   saves them.  Neither changes what is written: the trainer's ``config`` hard-codes the
   real ``dict_class`` name, and the state_dict keys are the real class's.
2. copies ``trainer_0/ae.pt`` and ``trainer_0/config.json`` to ``<ClassName>/``;
3. loads it back with the package's generic loader ``dictionary_learning.utils.load_dictionary``
   and runs that object's own ``encode`` / ``decode`` on fixed inputs, saving
   ``<ClassName>/expected.safetensors``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import dictionary_learning
from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import (
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
)
from dictionary_learning.trainers.standard import StandardTrainer
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import load_dictionary

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
D, F, K = 16, 48, 4
GROUP_FRACTIONS = [1 / 6, 1 / 3, 1 / 2]  # -> group_sizes [8, 16, 24] in MatryoshkaBatchTopKTrainer
COMMON = dict(
    steps=10_000,
    activation_dim=D,
    dict_size=F,
    layer=6,
    lm_name="google/gemma-3-270m",
    submodule_name="resid_post_layer_6",
    seed=0,
    device="cpu",
)

_INSTANCES: list[torch.nn.Module] = []


def recording(cls):
    """A subclass of ``cls`` that records its instances (nothing else differs)."""

    class Recorded(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _INSTANCES.append(self)

    Recorded.__name__ = Recorded.__qualname__ = cls.__name__
    return Recorded


def _randn(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g) * scale + shift


def _uniform(g, *shape, lo, hi):
    return torch.rand(*shape, generator=g) * (hi - lo) + lo


def fill(ae: torch.nn.Module, seed: int) -> None:
    """Overwrite every float parameter/buffer with seeded random values.

    Decoder directions are deliberately NOT unit-norm (real trainers keep them unit-norm,
    except StandardTrainerAprilUpdate), so a converter that silently re-normalises shows up.
    Integer buffers (``k``, ``group_sizes``) are structural and kept.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(ae, AutoEncoder):
            ae.encoder.weight.copy_(_randn(g, F, D, scale=0.3))
            ae.encoder.bias.copy_(_randn(g, F, scale=0.5, shift=-0.5))
            ae.bias.copy_(_randn(g, D, scale=0.2))
            ae.decoder.weight.copy_(_randn(g, D, F, scale=0.3))
        elif isinstance(ae, (AutoEncoderTopK, BatchTopKSAE)):
            ae.encoder.weight.copy_(_randn(g, F, D, scale=0.3))
            ae.encoder.bias.copy_(_randn(g, F, scale=0.5))
            ae.b_dec.copy_(_randn(g, D, scale=0.2))
            ae.decoder.weight.copy_(_randn(g, D, F, scale=0.3))
            ae.threshold.copy_(_uniform(g, (), lo=1.5, hi=2.5))
        elif isinstance(ae, MatryoshkaBatchTopKSAE):
            ae.W_enc.copy_(_randn(g, D, F, scale=0.3))
            ae.b_enc.copy_(_randn(g, F, scale=0.5))
            ae.b_dec.copy_(_randn(g, D, scale=0.2))
            ae.W_dec.copy_(_randn(g, F, D, scale=0.3))
            ae.threshold.copy_(_uniform(g, (), lo=1.5, hi=2.5))
        elif isinstance(ae, JumpReluAutoEncoder):
            ae.W_enc.copy_(_randn(g, D, F, scale=0.3))
            ae.b_enc.copy_(_randn(g, F, scale=0.5))
            ae.b_dec.copy_(_randn(g, D, scale=0.2))
            ae.W_dec.copy_(_randn(g, F, D, scale=0.3))
            ae.threshold.copy_(_uniform(g, F, lo=0.5, hi=2.5))
        else:  # pragma: no cover
            raise TypeError(type(ae))


class FakeActivationBuffer:
    """Stands in for ActivationBuffer: same ``config`` keys; yields one batch that trainSAE
    never trains on (steps=0).  Before yielding it fills the freshly built dictionaries."""

    def __init__(self, seed: int):
        self.seed = seed

    @property
    def config(self):
        return {
            "d_submodule": D,
            "io": "out",
            "n_ctxs": 30000,
            "ctx_len": 128,
            "refresh_batch_size": 512,
            "out_batch_size": 8192,
            "device": "cpu",
        }

    def __iter__(self):
        for ae in _INSTANCES:
            fill(ae, self.seed)
        yield torch.zeros(8, D)


CASES = [
    # (ClassName, trainer class, extra trainer kwargs, real dict class, seed)
    ("AutoEncoder", StandardTrainer, {}, AutoEncoder, 1),
    ("AutoEncoderTopK", TopKTrainer, {"k": K}, AutoEncoderTopK, 2),
    ("BatchTopKSAE", BatchTopKTrainer, {"k": K}, BatchTopKSAE, 3),
    ("MatryoshkaBatchTopKSAE", MatryoshkaBatchTopKTrainer,
     {"k": K, "group_fractions": GROUP_FRACTIONS}, MatryoshkaBatchTopKSAE, 4),
    ("JumpReluAutoEncoder", JumpReluTrainer, {}, JumpReluAutoEncoder, 5),
]


def save_with_trainSAE(name, trainer_cls, extra, dict_cls, seed) -> Path:
    out = HERE / name
    out.mkdir(exist_ok=True)
    _INSTANCES.clear()
    cfg = {"trainer": trainer_cls, "dict_class": recording(dict_cls), **COMMON, **extra}
    with tempfile.TemporaryDirectory() as tmp:
        trainSAE(FakeActivationBuffer(seed), [cfg], steps=0, save_dir=tmp, device="cpu")
        for fn in ("ae.pt", "config.json"):
            shutil.copyfile(Path(tmp) / "trainer_0" / fn, out / fn)
    assert len(_INSTANCES) == 1
    return out


def expected_outputs(name: str, folder: Path) -> dict[str, torch.Tensor]:
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(123)) * 2
    ae, config = load_dictionary(str(folder), device="cpu")
    assert type(ae).__name__ == name == config["trainer"]["dict_class"], (type(ae), config)
    with torch.no_grad():
        f = ae.encode(x)
        x_hat = ae.decode(f)
        out = {"x": x, "f": f, "x_hat": x_hat}
        # Extra variants (documented in README.md).
        if name == "AutoEncoder":
            raw = AutoEncoder.from_pretrained(str(folder / "ae.pt"), normalize_decoder=False)
            out["f_raw"] = raw.encode(x)
            out["x_hat_raw"] = raw.decode(out["f_raw"])
            assert torch.allclose(out["x_hat_raw"], x_hat, atol=1e-5)
        elif name == "AutoEncoderTopK":
            out["f_use_threshold"] = ae.encode(x, use_threshold=True)
        elif name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            out["f_no_threshold"] = ae.encode(x, use_threshold=False)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def main() -> int:
    torch.manual_seed(0)
    for name, trainer_cls, extra, dict_cls, seed in CASES:
        folder = save_with_trainSAE(name, trainer_cls, extra, dict_cls, seed)
        tensors = expected_outputs(name, folder)
        frac = (tensors["f"] != 0).float().mean().item()
        assert 0.03 < frac < 0.8, (name, frac)
        # No metadata: safetensors writes its metadata map in random order, which would make
        # every re-run byte-different; versions are recorded in README.md instead.
        save_file(tensors, str(folder / "expected.safetensors"))
        sd = torch.load(folder / "ae.pt")
        keys = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                         for k, v in sd.items())
        cfg = json.loads((folder / "config.json").read_text())
        print(f"{name} (dictionary_learning {dictionary_learning.__version__}, torch {torch.__version__}): "
              f"fired {frac:.3f}; extra {sorted(set(tensors) - {'x', 'f', 'x_hat'})}; "
              f"trainer_class {cfg['trainer']['trainer_class']}; state_dict: {keys}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
