"""Train one tiny SALA model on niah_single samples of one length, then score it teacher-forced at several lengths,
with and without HyPE query scaling at inference. Usage (from this folder, the repo's venv):

  python train.py NAME --layers 4 --softmax-layers 0,3 --train-len 192 --steps 2500 --eval-lens 192,768,3072 \
      --hype 0,500,100 --out results.jsonl

Training data: `--ntrain` niah_single documents (prompt + answer, BOS first) of `--train-len` tokens, seed 1234,
next-token loss on every token, batches of `--batch` padded documents in a fixed order. Evaluation: 48 prompts per
length (seed 98765, needle depths evenly spaced), teacher-forced (`sala.eval.teacher_forced`): exact match of all
answer tokens, first token, answer-token accuracy. Appends one JSON line per run to `--out`.
"""
import argparse
import json
import time

import torch

from sala.eval.tasks import generate
from sala.eval.teacher_forced import teacher_forced_report, teacher_forced_sample
from sala.modeling import SalaConfig, SalaForCausalLM
from sala.modeling.tokenizer import load_tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("name")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--softmax-layers", default="0,3")
ap.add_argument("--train-len", type=int, default=192)
ap.add_argument("--ntrain", type=int, default=40000)
ap.add_argument("--steps", type=int, default=2500)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--warmup", type=int, default=30)
ap.add_argument("--train-hype", type=float, default=0.0, help="HyPE base during training too (0: off)")
ap.add_argument("--eval-lens", default="192,768,3072")
ap.add_argument("--neval", type=int, default=48)
ap.add_argument("--eval-every", type=int, default=500)
ap.add_argument("--hype", default="0,500", help="HyPE bases for the final evaluation (0: off)")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--out", default="results.jsonl")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
tok = load_tokenizer("sala")
t0 = time.time()
train = [tok.encode(s.input + s.answer, add_bos=True)
         for s in generate("niah_single", a.train_len, a.ntrain, tok.count, seed=1234,
                           depths=lambda i: ((i * 0.6180339887) % 1.0))]
evals = {L: list(generate("niah_single", L, a.neval, tok.count, seed=98765)) for L in map(int, a.eval_lens.split(","))}
print(f"data {time.time() - t0:.0f}s: {len(train)} training documents of {min(map(len, train))}-{max(map(len, train))} "
      "tokens", flush=True)

softmax = {int(x) for x in a.softmax_layers.split(",")}
cfg = SalaConfig.from_preset(
    "sala-tiny", vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=a.layers,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, lightning_nh=4, lightning_nkv=4, lightning_head_dim=32,
    initializer_range=0.1, use_sparse_attention=False, hype_query_scale_base=a.train_hype or None,
    mixer_types=["minicpm4" if i in softmax else "lightning-attn" for i in range(a.layers)])
model = SalaForCausalLM(cfg)
decay, no_decay = [], []
for n, p in model.named_parameters():
    (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=a.lr, betas=(0.9, 0.95))


def evaluate(lengths, hype: float) -> dict:
    """Teacher-forced niah_single scores (%) per length with HyPE base `hype` (0: off) at inference."""
    model.eval()
    model.config.hype_query_scale_base = hype or None
    out = {}
    with torch.no_grad():
        for L in lengths:
            rows = [teacher_forced_sample(model, tok, s.input, s.outputs[0], torch.device("cpu")) for s in evals[L]]
            rep = teacher_forced_report(rows, [False] * len(rows))
            out[str(L)] = {k: rep[k] for k in ("n", "exact", "first_token", "token_accuracy")}
    model.config.hype_query_scale_base = a.train_hype or None
    model.train()
    return out


res = {"name": a.name, "args": vars(a), "params": sum(p.numel() for p in model.parameters()), "ckpts": []}
order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
losses, t0 = [], time.time()
model.train()
for step in range(1, a.steps + 1):
    for g in opt.param_groups:
        g["lr"] = a.lr * min(1.0, step / a.warmup)
    docs = [train[order[((step - 1) * a.batch + j) % len(order)]] for j in range(a.batch)]
    T = max(map(len, docs))
    ids = torch.zeros(len(docs), T, dtype=torch.long)
    lab = torch.full_like(ids, -100)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = torch.tensor(d)
        lab[i, :len(d)] = torch.tensor(d)
    loss = model(input_ids=ids, labels=lab, use_cache=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    losses.append(loss.item())
    if step % a.eval_every == 0 or step == a.steps:
        m = {"step": step, "train_loss": sum(losses[-20:]) / len(losses[-20:]), "elapsed": round(time.time() - t0),
             "scores": evaluate([min(evals)], a.train_hype)}
        res["ckpts"].append(m)
        print(json.dumps(m), flush=True)
res["final"] = {f"hype_{h:g}": evaluate(sorted(evals), h) for h in map(float, a.hype.split(","))}
print(json.dumps(res["final"]), flush=True)
with open(a.out, "a") as f:
    f.write(json.dumps(res) + "\n")
