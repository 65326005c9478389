"""Tokenizers for the runtime: everything becomes a Hugging Face ``tokenizers.Tokenizer``
(``tokenizer.json``), the one format :mod:`lowbit.runtime` reads.

:func:`llama2c_to_tokenizers` converts llama2.c's tokenizer (``tok512.bin``, read by
:class:`lowbit.llama2c.Llama2cTokenizer`) into an equivalent BPE:

* llama2.c prepends one space to non-empty text, splits it into UTF-8 characters
  (bytes ``<0xXX>`` for characters missing from the vocabulary) and then repeatedly
  merges the adjacent pair whose concatenation is in the vocabulary with the highest
  score, the leftmost on ties;
* the BPE gets a ``Prepend(" ")`` normalizer, no pre-tokenizer (the text is one word),
  ``byte_fallback``, and one merge rule per way of writing a vocabulary entry as the
  concatenation of two entries, ranked by the entry's score (highest first). BPE merges
  the lowest-ranked adjacent pair first, the leftmost on ties, which is the same choice
  as long as different entries have different scores (true of llama2.c's files for
  every entry longer than one character);
* BOS (id 1) is added by a template post-processor; decoding turns byte tokens back into
  bytes and drops the leading space of the text, as llama2.c does after BOS.
"""
from __future__ import annotations


def llama2c_to_tokenizers(tok):
    """A ``tokenizers.Tokenizer`` equivalent to a :class:`lowbit.llama2c.Llama2cTokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    def text(piece: bytes) -> str:
        return piece.decode("utf-8", errors="surrogateescape")

    special = {tok.unk_token_id: "<unk>", tok.bos_token_id: "<s>", tok.eos_token_id: "</s>"}
    vocab: dict[str, int] = {}
    for i, piece in enumerate(tok.pieces):
        name = special.get(i, text(piece))
        vocab.setdefault(name, i)
    merges = []
    for i, piece in enumerate(tok.pieces):
        if i in special or i in tok._byte_values or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            ia, ib = tok._ids.get(a), tok._ids.get(b)
            if ia is None or ib is None or ia in special or ib in special:
                continue
            merges.append((-tok.scores[i], i, cut, (text(a), text(b))))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[m[-1] for m in merges], unk_token="<unk>", byte_fallback=True,
                     fuse_unk=True)
    t = Tokenizer(bpe)
    t.normalizer = normalizers.Prepend(" ")
    t.add_special_tokens([AddedToken(special[k], special=True, normalized=False) for k in sorted(special)])
    t.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    t.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return t
