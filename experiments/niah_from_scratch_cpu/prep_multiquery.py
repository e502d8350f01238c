"""Training texts of niah_multiquery at 256 tokens (two needles and their questions need ~150), as many as prep.py's
Writes /work/exp_niah/data_multiquery.pt: the runs trained on it are scored on the same niah_single prompts."""
import torch

from sala.eval.tasks import generate
from sala.modeling.tokenizer import load_tokenizer

torch.set_num_threads(1)
tok = load_tokenizer(None)
D = torch.load("/work/exp_niah/data.pt")
train = [tok.encode(s.input + s.answer, add_bos=True)
         for s in generate("niah_multiquery", 256, len(D["train"]), tok.count, seed=1234)]
print("train lens", min(map(len, train)), max(map(len, train)), "mean", sum(map(len, train)) / len(train))
print(repr(tok.decode(train[0])))
torch.save({**D, "train": train, "train_spans": None}, "/work/exp_niah/data_multiquery.pt")
