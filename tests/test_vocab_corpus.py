import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

from saeflow.config import CorpusConfig, VocabConfig
from saeflow.corpus import build_contexts, probing_dataset_names, sae_probes_texts, special_token_ids
from saeflow.vocab import VocabError, alpha_tokens, build_vocab

WORDS = ("the cat sat on a mat with snake short sun apple Banana zebra quick brown fox jumps over lazy dog "
         "42 cats x2 hello world Zulu yak igloo umbrella violin whale nest orange kite egg rain tree gold "
         "jam lamp moon pearl queen").split()


def _bpe(marker: str) -> PreTrainedTokenizerFast:
    if marker == "Ġ":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>", "<unk>", "<0x41>"])
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("marker", ["Ġ", "▁"])
def test_alpha_tokens_handle_both_space_markers(marker):
    tok = _bpe(marker)
    df = alpha_tokens(tok)
    texts = set(df["text"])
    assert " snake" in texts or " sn" in texts  # marked words read with a real leading space
    assert all(t.lstrip(" ").isalpha() and t.lstrip(" ").isascii() for t in texts)
    assert not any(t.startswith(("<", "Ġ", "▁")) for t in texts)
    # a marked entry is read with a leading space; an unmarked one without
    for token, text in zip(df["token"], df["text"]):
        assert text.startswith(" ") == token.startswith(marker)
    row = df[df["text"].str.strip() == "zebra"]
    if len(row):
        assert row["first_letter"].iloc[0] == "z" and row["label"].iloc[0] == 25
    assert (df["label"] == df["first_letter"].map(lambda c: ord(c) - 97)).all()


def test_split_is_seeded_80_20_by_token():
    tok = _bpe("Ġ")
    a = build_vocab(tok, VocabConfig(seed=1))
    b = build_vocab(tok, VocabConfig(seed=1))
    c = build_vocab(tok, VocabConfig(seed=2))
    assert a.equals(b) and not a.equals(c)
    n_train = (a["split"] == "train").sum()
    assert n_train == int(len(a) * 0.8)
    assert a["token_id"].is_unique


def test_too_few_alphabetic_tokens_is_refused():
    tok = _bpe("Ġ")
    with pytest.raises(VocabError, match="only .* alphabetic tokens"):
        build_vocab(tok, VocabConfig(min_tokens=100_000))


def test_contexts_pack_documents_with_bos_and_separators():
    tok = _bpe("Ġ")
    ctx = build_contexts(["the cat sat", "on a mat"] * 20, tok, context_size=8, n_contexts=5)
    assert ctx.shape == (5, 8) and ctx.dtype == np.int32
    assert (ctx[:, 0] == tok.bos_token_id).all()
    assert (ctx[:, 1:] != tok.bos_token_id).all()
    assert (ctx == tok.eos_token_id).any()
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} <= special_token_ids(tok)
    with pytest.raises(ValueError, match="lower corpus.n_contexts"):
        build_contexts(["the cat"], tok, context_size=8, n_contexts=50)


def test_default_corpus_excludes_every_probing_prompt():
    import glob
    import os

    import pandas as pd

    from saeflow.corpus import sae_probes_data_dir

    names = probing_dataset_names()
    assert len(names) == 113
    texts = set(sae_probes_texts(True))
    assert len(texts) > 50_000
    data = sae_probes_data_dir()
    # spot-check: no prompt of a few probing datasets (and an OOD file) is in the corpus
    for name in names[:5]:
        prompts = set(pd.read_csv(data / "cleaned_data" / f"{name}.csv.zst")["prompt"].astype(str))
        assert not prompts & texts
    ood = sorted(glob.glob(str(data / "OOD data" / "*.csv.zst")))[0]
    assert not set(pd.read_csv(ood)["prompt"].astype(str)) & texts


def test_corpus_config_validation():
    with pytest.raises(ValueError, match="eval_contexts"):
        CorpusConfig(n_contexts=10, eval_contexts=10)
    with pytest.raises(ValueError, match="hf_dataset"):
        CorpusConfig(source="hf")
