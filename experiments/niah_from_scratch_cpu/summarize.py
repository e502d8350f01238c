"""results.jsonl -> results.md (table over checkpoints) and results.json."""
import json

runs = [json.loads(l) for l in open("/work/exp_niah/results.jsonl")]
json.dump(runs, open("/work/exp_niah/results.json", "w"), indent=1)
rows = ["| run | params | step | tokens | train loss (last 20) | answer CE | all-token acc | first-token acc "
        "| later-token acc |",
        "|---|---|---|---|---|---|---|---|---|"]
for r in runs:
    for c in r["ckpts"]:
        rows.append(f"| {r['name']} | {r['params']/1e6:.2f}M | {c['step']} | {c['tokens']/1e3:.0f}K | "
                    f"{c['train_loss']:.3f} | "
                    f"{c['ans_loss']:.2f} | {c['all_acc']:.3f} | {c['first_acc']:.3f} | {c['rest_tok_acc']:.3f} |")
open("/work/exp_niah/results.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
