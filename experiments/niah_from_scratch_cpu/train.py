"""One controlled niah_single from-scratch run. Usage:
  python train.py NAME --arch sala|llama --init 0.1 --lr 3e-3 --attn-rope 0|1 --steps 600 --eval-every 100
Appends a JSON line with the checkpoint metrics to results.jsonl."""
import argparse
import json
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("name")
ap.add_argument("--arch", default="sala")
ap.add_argument("--init", type=float, default=0.1)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--attn-rope", type=int, default=0)
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--eval-every", type=int, default=100)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--warmup", type=int, default=30)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--data", default="/work/exp_niah/data.pt", help="cached data (prep.py, prep_multiquery.py)")
ap.add_argument("--hype", type=float, default=0.0, help="SALA: hype_query_scale_base (0: off)")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--softmax-layers", default="0,3", help="SALA: comma-separated softmax (minicpm4) layer ids")
a = ap.parse_args()

D = torch.load(a.data)
torch.manual_seed(a.seed)
H, L, NH, HD, FF, V = 128, a.layers, 4, 32, 384, 8192
SOFTMAX = {int(x) for x in a.softmax_layers.split(",")}
if a.arch == "sala":
    from sala.modeling import SalaConfig, SalaForCausalLM
    cfg = SalaConfig.from_preset("sala-tiny", vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                                 num_attention_heads=NH, num_key_value_heads=2, head_dim=HD, lightning_nh=NH,
                                 lightning_nkv=NH, lightning_head_dim=HD, initializer_range=a.init,
                                 attn_use_rope=bool(a.attn_rope), use_sparse_attention=False,
                                 hype_query_scale_base=a.hype or None,
                                 mixer_types=["minicpm4" if i in SOFTMAX else "lightning-attn" for i in range(L)])
    model = SalaForCausalLM(cfg)
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
                      num_key_value_heads=2, head_dim=HD, initializer_range=a.init, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
nparam = sum(p.numel() for p in model.parameters())
decay, no_decay = [], []
for n, p in model.named_parameters():
    (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=a.lr, betas=(0.9, 0.95))

def pad(seqs):
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    lab = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(s)] = torch.tensor(s)
    return ids, lab

@torch.no_grad()
def evaluate():
    model.eval()
    allc = firstc = tokc = ntok = 0
    ans_loss = 0.0
    ev, sp = D["eval"], D["eval_spans"]
    for i in range(0, len(ev), 16):
        ids, lab = pad(ev[i:i + 16])
        logits = model(input_ids=ids, use_cache=False).logits.float()
        for j, (s, e) in enumerate(sp[i:i + 16]):
            pred = logits[j, s - 1:e - 1].argmax(-1)
            gold = ids[j, s:e]
            ok = (pred == gold)
            allc += int(ok.all())
            firstc += int(ok[0])
            tokc += int(ok[1:].sum())
            ntok += e - s - 1
            ans_loss += F.cross_entropy(logits[j, s - 1:e - 1], gold).item()
    model.train()
    n = len(ev)
    return dict(all_acc=allc / n, first_acc=firstc / n, rest_tok_acc=tokc / ntok, ans_loss=ans_loss / n)

g = torch.Generator().manual_seed(0)            # same data order for every run
order = torch.randperm(len(D["train"]), generator=g).tolist()
res = dict(name=a.name, args=vars(a), params=nparam, ckpts=[])
tokens = 0
t0 = time.time()
losses = []
model.train()
for step in range(1, a.steps + 1):
    lr = a.lr * min(1.0, step / a.warmup)
    for gr in opt.param_groups:
        gr["lr"] = lr
    idx = \
          [order[((step - 1) * a.batch + k) % len(order)] for k in range(a.batch)]
    ids, lab = pad([D["train"][k] for k in idx])
    tokens += int((lab != -100).sum())
    loss = model(input_ids=ids, labels=lab, use_cache=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    losses.append(loss.item())
    if step % a.eval_every == 0 or step == a.steps:
        m = evaluate()
        m.update(step=step, tokens=tokens, train_loss=sum(losses[-20:]) / len(losses[-20:]),
                 elapsed=round(time.time() - t0, 1))
        res["ckpts"].append(m)
        print(json.dumps(m), flush=True)
with open("/work/exp_niah/results.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
