"""Where a collapsed LoRA run loses its candidates apart (docs/RESULTS.md, the 2,000-user runs).

    python docs/study/collapse.py RUN_DIR CHECKPOINT.safetensors [--domain data/amazon/sports] [--users 16]

RUN_DIR is a finished LoRA run (its best.safetensors is the "kept" state); CHECKPOINT is a training checkpoint of
the same run shape (ckpt/step-*/trained.safetensors) taken after the loss sat at ln C. For the base with a fresh head
(LoRA B = 0, the head's dense layer re-initialised), the kept and the collapsed state it prints, on the first test
users of the domain with their fixed candidates: how alike the head's inputs are (mean cosine between candidates'
pooled final states), how much of the head's tanh is saturated (|W h + b| > 3), the spread of scores within a user,
and per block the mean cosine between token states (400 sampled tokens) with the residual stream's RMS.
"""

import argparse

import torch

from xcross.data import load_domain
from xcross.methods import load_trained
from xcross.recommender import Recommender
from xcross.weights import load_tensors


def off_diagonal_cosine(x: torch.Tensor) -> torch.Tensor:
    n = torch.nn.functional.normalize(x.float(), dim=-1)
    c = n @ n.T
    return c[~torch.eye(len(c), dtype=torch.bool)]


def measure(rec: Recommender, users, tag: str) -> None:
    pooled, blocks = [], {}
    hooks = [rec.model.head.register_forward_hook(lambda m, i, o: pooled.append(i[0].detach()))]
    hooks += [layer.register_forward_hook(lambda m, i, o, k=k: blocks.setdefault(k, []).append(o.detach()))
              for k, layer in enumerate(rec.model.decoder.model.layers)]
    scores = torch.tensor(rec.score_batch(users))
    for hook in hooks:
        hook.remove()
    h = torch.cat([x.reshape(-1, x.shape[-1]) for x in pooled]).float()  # every candidate's pooled final state
    pre, alike = rec.model.head.dense(h), off_diagonal_cosine(h)
    print(f"{tag}: score spread within a user {scores.std(1).mean():.4f}; head input RMS {h.pow(2).mean().sqrt():.2f}; "
          f"cosine between candidates' head inputs mean {alike.mean():.4f} "
          f"(min {alike.min():.4f}); tanh saturated (|W h + b| > 3) "
          f"{(pre.abs() > 3).float().mean():.3f}")
    g = torch.Generator().manual_seed(0)
    cells = []
    for k in sorted(blocks):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in blocks[k]]).float()
        x = x[x.abs().sum(-1) > 0]  # padding rows out
        x = x[torch.randperm(len(x), generator=g)[:400]]
        cells.append(f"{k}: {off_diagonal_cosine(x).mean():.3f} ({x.pow(2).mean(-1).sqrt().mean():.0f})")
    print("  per block, mean cosine between tokens (residual RMS): " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--domain", default="data/amazon/sports")
    parser.add_argument("--users", type=int, default=16)
    args = parser.parse_args()
    domain = load_domain(args.domain)
    users = [([domain.items[i] for i in e.history], [domain.items[i] for i in e.candidates])
             for e in domain.test[:args.users]]
    rec = Recommender.from_run(args.run_dir, dtype=torch.bfloat16)
    changed = {name: p for name, p in rec.model.named_parameters() if "lora_B" in name or name.startswith("head.dense")}
    kept = {name: p.detach().clone() for name, p in changed.items()}  # the only tensors changed below
    torch.manual_seed(0)
    rec.model.head.dense.reset_parameters()
    with torch.no_grad():
        for name, p in changed.items():
            if "lora_B" in name:
                p.zero_()
    measure(rec, users, "base, fresh head")
    with torch.no_grad():
        for name, p in changed.items():
            p.copy_(kept[name])
    measure(rec, users, "kept (best.safetensors)")
    for path in args.checkpoints:
        load_trained(rec.model, load_tensors(path)[0])  # as a resumed training loads its checkpoint
        measure(rec, users, f"collapsed ({path})")


if __name__ == "__main__":
    main()
