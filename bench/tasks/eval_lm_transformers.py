"""transformers' side of bench/tasks/eval_speed_lm.sh: the mean next-token loss of a decoder LM
over JSONL rows {"text"}, as `amalgam eval MODEL --task FILE --max-len N` computes it
(tokenizer with special tokens, truncation at N, batches of B rows padded right, loss over
every predicted real token). Prints one JSON line with the loss, the tokens and the loop's
seconds (tokenization included).

    python bench/tasks/eval_lm_transformers.py MODEL FILE --max-len 64 --threads 2
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = [json.loads(l)["text"] for l in open(args.data) if l.strip()]
    start = time.time()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(rows), args.batch_size):
            enc = tok(rows[i:i + args.batch_size], padding=True, truncation=True,
                      max_length=args.max_len, return_tensors="pt")
            logits = model(**enc).logits.float()
            mask = enc["attention_mask"][:, 1:].bool()
            lp = torch.log_softmax(logits[:, :-1], -1)
            nll = -lp.gather(-1, enc["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
            total += nll[mask].double().sum().item()
            count += int(mask.sum())
    print(json.dumps({"loss": total / count, "tokens": count, "loop_s": round(time.time() - start, 3),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
