"""What the small-model training run (train_small_gpu.py) and its decay branches (train_small_branch.py) share:
the evaluation plan, building a packed dataset when it is missing, and the decay set's path."""
from __future__ import annotations

import os
import time


def eval_plan(cpu: bool) -> tuple[list[int], dict[str, int]]:
    """NIAH lengths and samples per task: 1x, 2x, 4x the 4K training length on the GPU, tiny on the CPU."""
    if cpu:
        return [256, 512, 1024], {"niah_single": 2, "niah_multikey": 1}
    return [4096, 8192, 16384], {"niah_single": 50, "niah_multikey": 15, "niah_multivalue": 15, "vt": 15}


def synthetic_settings() -> tuple[tuple[int, ...], tuple[str, ...]]:
    """SYNTHETIC_LENGTHS and SYNTHETIC_TASKS: the synthetic samples mixed into the corpus and the decay sets."""
    lengths = tuple(int(x) for x in os.environ.get("SYNTHETIC_LENGTHS", "256,512,1024,2048,4096").split(",") if x)
    tasks = tuple(x for x in os.environ.get("SYNTHETIC_TASKS", "niah_single,niah_multikey,niah_multivalue,vt")
                  .split(",") if x)
    return lengths, tasks


def packed(path: str, srcs: list[str], fraction: float, sample_lengths: tuple[int, ...], seed: int, *, cpu: bool,
           tasks: tuple[str, ...], max_docs: int | None = None) -> str:
    """The packed dataset at `path` (built when missing): srcs + `fraction` synthetic retrieval samples. An existing
    one built with another mix is refused (naming the field), never silently reused."""
    sample_lengths = (256,) if cpu else tuple(sample_lengths)   # the CPU dry run: one short length
    if os.path.exists(os.path.join(path, "meta.json")):
        from sala.data import read_meta
        meta = read_meta(path)
        syn = meta.get("synthetic") or {}
        want = {"sources": list(srcs), "synthetic fraction": fraction, "synthetic tasks": list(tasks),
                "synthetic lengths": list(sample_lengths), "synthetic seed": seed}
        have = {"sources": meta.get("sources"), "synthetic fraction": syn.get("fraction"),
                "synthetic tasks": syn.get("tasks"), "synthetic lengths": syn.get("lengths"),
                "synthetic seed": syn.get("seed")}
        for key in want:
            if have[key] != want[key]:
                raise SystemExit(f"{path} exists with {key} {have[key]}, but this run asks for {want[key]}: remove it "
                                 "or give this run another DATA")
    else:
        from sala.data.prepare import SyntheticMix, prepare
        t0 = time.time()
        prepare(path, srcs, tokenizer="sala", val_fraction=0.01, seed=0, log=print,
                max_docs=max_docs,
                synthetic=SyntheticMix(fraction=fraction, tasks=tasks, lengths=sample_lengths, seed=seed))
        print(f"prepared {path} in {time.time() - t0:.0f}s")
    return path


def data_epochs(stage, data: str) -> float:
    """How many times `stage` (a StageConfig) reads the training split of its dataset (`data` when it names none)."""
    from sala.data import read_meta
    tokens = read_meta(stage.data or data)["splits"]["train"]["tokens"]
    return stage.steps * stage.micro_batch * stage.grad_accum * stage.seq_len / max(1, tokens)


def decay_set(data: str, *, cpu: bool) -> str | None:
    """The decay stage's dataset from DECAY_SOURCES / DECAY_MAX_DOCS / DECAY_SYNTHETIC_FRACTION (built when missing),
    or None without DECAY_SYNTHETIC_FRACTION (the decay stage then reads the corpus)."""
    if not os.environ.get("DECAY_SYNTHETIC_FRACTION"):
        return None
    sources = [x for x in os.environ.get("DECAY_SOURCES", "stdlib").split(",") if x]
    max_docs = int(os.environ.get("DECAY_MAX_DOCS", "0") or 0) or None
    fraction = float(os.environ["DECAY_SYNTHETIC_FRACTION"])
    tag = (("" if sources == ["stdlib"] and not max_docs else "_" + "-".join(sources) + (f"_{max_docs}" if max_docs else ""))
           + ("" if fraction == 0.6 else f"_syn{round(100 * fraction)}"))   # 0.6: the recipe's share, untagged
    lengths, tasks = synthetic_settings()
    return packed(data.rstrip("/") + "_decay" + tag, sources, fraction, lengths,
                  seed=4321, cpu=cpu, tasks=tasks, max_docs=(max_docs or 40) if cpu else max_docs)
