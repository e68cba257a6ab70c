"""The character-level tokenizer of the embedded tiny model, built locally with ``tokenizers``.

Vocabulary: 4 special tokens (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3), the characters of the
synthetic pretraining corpus together with printable ASCII (sorted), and 256 byte-fallback tokens
``<0x00>``…``<0xFF>`` so that any UTF-8 text round-trips. It is a BPE model with no merges (one token
per character: digits stay separate, which arithmetic tasks need). Encoding with special tokens
prepends ``<s>``; decoding concatenates characters.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from falqon_dist.data.synthetic import pretrain_corpus

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
_PRINTABLE = string.digits + string.ascii_letters + string.punctuation + " \n\t"


def corpus_alphabet(num_records: int = 2000, seed: int = 0) -> list[str]:
    """Sorted characters of a sample of the pretraining corpus, plus printable ASCII."""
    chars = set(_PRINTABLE)
    for record in pretrain_corpus(num_records, seed):
        chars.update(record["prompt"])
        chars.update(record["response"])
    return sorted(chars)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer (deterministic: same vocabulary on every machine)."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *corpus_alphabet(), *(f"<0x{b:02X}>" for b in range(256))):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, byte_fallback=True))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
    )
