#!/usr/bin/env python3
"""The reference evaluation `amalgam eval` is timed against: accuracy of a linear head on the
mean-pooled output of a BERT-family encoder, with Hugging Face transformers on CPU.

Same work as `amalgam eval MODEL --task TASK --head HEAD --max-len N --batch-size B`: tokenize with
the model's tokenizer (truncation at N), batches of B rows padded to their longest, mean pooling
over the attention mask (sentence-transformers' pooling), head, argmax. Prints one JSON line:
accuracy, examples, the time of the evaluation loop (tokenization included) and of the whole
process so far (imports and loading included).

    python3 bench/tasks/eval_transformers.py MODEL TASK.jsonl HEAD.safetensors --max-len 64
"""
import time

START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("task")
    ap.add_argument("head")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    head = load_file(args.head)
    with open(args.task) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    loop = time.time()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(rows), args.batch_size):
            batch = rows[i:i + args.batch_size]
            enc = tok([r["text"] for r in batch], padding=True, truncation=True,
                      max_length=args.max_len, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pred = (pooled @ head["weight"].T + head["bias"]).argmax(-1)
            correct += sum(int(p) == r["label"] for p, r in zip(pred, batch))
    end = time.time()
    print(json.dumps({"accuracy": correct / len(rows), "examples": len(rows),
                      "loop_s": round(end - loop, 3), "process_s": round(end - START, 3),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
