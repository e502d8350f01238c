"""Generate niah_single training/eval texts once (fixed seeds), tokenize, cache to data.pt."""
import sys

import torch

from sala.eval.tasks import generate
from sala.modeling.tokenizer import load_tokenizer

torch.set_num_threads(1)
tok = load_tokenizer(None)
LEN = int(sys.argv[1]) if len(sys.argv) > 1 else 288
NTRAIN, NEVAL = 4000, 64

def build(seed, n):
    seqs, ans_spans = [], []
    for s in generate("niah_single", LEN, n, tok.count, seed=seed):
        p = tok.encode(s.input, add_bos=True)
        full = tok.encode(s.input + s.answer, add_bos=True)
        assert full[:len(p)] == p, "prompt tokenization not a prefix"
        num = tok.encode(" " + s.outputs[0])     # tokens of the number alone
        assert full[len(p):len(p) + len(num)] == num, (full[len(p):], num)
        seqs.append(full)
        ans_spans.append((len(p), len(p) + len(num)))
    return seqs, ans_spans

tr, trs = build(1234, NTRAIN)
ev, evs = build(98765, NEVAL)
print("train lens", min(map(len, tr)), max(map(len, tr)), "eval", min(map(len, ev)), max(map(len, ev)))
print("answer token counts", sorted({b - a for a, b in trs}))
print(repr(tok.decode(ev[0][:60])), [tok.decode([t]) for t in ev[0][evs[0][0]:evs[0][1]]])
torch.save({"train": tr, "train_spans": trs, "eval": ev, "eval_spans": evs, "len": LEN}, "/work/exp_niah/data.pt")
