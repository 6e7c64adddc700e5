//! The base model's side of `amalgam moe`'s router weights ([`amalgam::moe::PromptEncoder`]):
//! prompts tokenized as mergekit-moe tokenizes them (the base's tokenizer, no special tokens, its
//! BOS prepended, left padding with BOS, or EOS when there is no BOS), then token embeddings
//! (`cheap_embed`) or the residual stream entering each decoder layer (`hidden*`), computed
//! layer by layer so that memory holds one layer's weights.
//!
//! mergekit runs the forward pass in bfloat16; this one runs in f32, so `hidden` gates differ
//! from mergekit's by bf16 rounding (measured on the test fixtures: see
//! `crates/amalgam-cli/tests/moe.rs`).

use std::path::{Path, PathBuf};

use amalgam::moe::{GateMode, PromptEncoder};

use crate::config::{Arch, DecoderConfig};
use crate::decoder::residual_streams;
use crate::error::{Error, Result};
use crate::tokenize::Tok;
use crate::weights::Weights;

/// The base model, ready to turn prompts into gate vectors.
pub struct BaseEncoder {
    weights: Weights,
    cfg: DecoderConfig,
    tok: Tok,
    /// Prepended to every prompt (none when the tokenizer has no BOS token).
    bos: Option<u32>,
    /// Left padding.
    pad: u32,
    path: PathBuf,
    /// Vectors computed by `prepare`, by prompt set.
    cache: std::collections::HashMap<Vec<String>, Vec<Vec<f32>>>,
    /// Told the layers done in a forward pass (and the layer count when a pass is over).
    progress: Box<dyn FnMut(usize) + Send>,
}

impl BaseEncoder {
    /// Open the decoder at `base` (a folder with config.json and tokenizer.json). `progress`
    /// is told how many of the decoder's layers a forward pass has done.
    pub fn open(base: &Path, progress: Box<dyn FnMut(usize) + Send>) -> Result<BaseEncoder> {
        let mut weights = Weights::open(base)?;
        weights.select_prefix(crate::decoder::PREFIXES, crate::decoder::PROBE)?;
        let dir = weights.model().dir.clone();
        let cfg = match Arch::load(&dir)? {
            Arch::Decoder(c) => c,
            Arch::Bert(_) => {
                return Err(Error::Argument(format!(
                    "{}: an MoE base must be a decoder LM (Llama, Mistral, Qwen2, Qwen3), not BERT",
                    base.display()
                )));
            }
        };
        let tok = Tok::load(&dir, usize::MAX >> 1)?;
        let bos = tok.special("bos_token");
        let pad = bos.or(tok.special("eos_token")).unwrap_or(0);
        Ok(BaseEncoder {
            weights,
            cfg,
            tok,
            bos,
            pad,
            path: base.to_path_buf(),
            cache: Default::default(),
            progress,
        })
    }

    /// Token ids per prompt, BOS first.
    fn tokenize(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
        let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = self.tok.encode_plain(&texts)?;
        ids.into_iter()
            .zip(prompts)
            .enumerate()
            .map(|(i, (ids, p))| {
                if ids.is_empty() {
                    return Err(Error::Argument(format!(
                        "prompt {i} ({p:?}) tokenizes to no tokens with {}; give a prompt with text in it",
                        self.tok.path().display()
                    )));
                }
                Ok(self.bos.into_iter().chain(ids).collect())
            })
            .collect()
    }

    /// The vectors of every set in `sets` (one pass over the model for the hidden modes).
    fn encode_sets(&mut self, sets: &[&[String]], mode: GateMode) -> Result<Vec<Vec<Vec<f32>>>> {
        // Per set, its prompts' token ids.
        let batches = sets
            .iter()
            .map(|p| {
                if p.is_empty() {
                    return Err(Error::Argument("no prompts to encode".into()));
                }
                self.tokenize(p)
            })
            .collect::<Result<Vec<_>>>()?;
        let (h, layers) = (self.cfg.hidden_size, self.cfg.num_hidden_layers);
        let out = if mode == GateMode::CheapEmbed {
            batches
                .iter()
                .map(|rows| -> Result<Vec<Vec<f32>>> {
                    // mergekit: the masked sum of token embeddings over tokens and prompts,
                    // normalised (norm clamped at 1e-8), the same for every layer; in f32 in
                    // torch's order: each prompt's tokens summed, then the prompts.
                    let mut sum = vec![0f32; h];
                    for row in rows {
                        let e = self
                            .weights
                            .rows("embed_tokens.weight", row, &[self.cfg.vocab_size, h])?
                            .to_vec2::<f32>()?;
                        let mut one = vec![0f32; h];
                        for r in &e {
                            one.iter_mut().zip(r).for_each(|(a, b)| *a += b);
                        }
                        sum.iter_mut().zip(&one).for_each(|(a, b)| *a += b);
                    }
                    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
                    let v: Vec<f32> = sum.iter().map(|x| x / norm).collect();
                    Ok(vec![v; layers])
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            // Every set's prompts in one left-padded batch, so each layer's weights are read
            // once and multiplied with every prompt at once. Rows do not see each other, pads
            // attend to nothing (their states do not depend on their position), and RoPE is
            // relative, so each set's states are what its own batch (mergekit's) gives, in the
            // last positions: its own padded window.
            let t = batches.iter().flatten().map(Vec::len).max().unwrap_or(0);
            let (mut ids, mut pad) = (Vec::new(), Vec::new());
            for row in batches.iter().flatten() {
                let extra = t - row.len();
                ids.push(
                    std::iter::repeat_n(self.pad, extra)
                        .chain(row.iter().copied())
                        .collect(),
                );
                pad.push((0..t).map(|j| j < extra).collect());
            }
            let streams =
                residual_streams(&mut self.weights, &self.cfg, &ids, &pad, &mut self.progress)?;
            let mut first = 0;
            batches
                .iter()
                .map(|set| {
                    // The set's own batch is as long as its longest prompt.
                    let rows = set.len();
                    let own = set.iter().map(Vec::len).max().unwrap_or(0);
                    let at = first;
                    first += rows;
                    streams
                        .iter()
                        .map(|s| -> Result<Vec<f32>> {
                            let s = s.narrow(0, at, rows)?.narrow(1, t - own, own)?;
                            // `hidden`/`hidden_last`: the last position (never a pad with left
                            // padding); `hidden_avg`: the mean over every position of the set's
                            // batch, pads included, as mergekit takes it. Then the mean over
                            // prompts.
                            let per_prompt = if mode == GateMode::HiddenAvg {
                                s.mean(1)?
                            } else {
                                s.narrow(1, own - 1, 1)?.squeeze(1)?
                            };
                            Ok(per_prompt.mean(0)?.to_vec1::<f32>()?)
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?
        };
        (self.progress)(layers);
        Ok(out)
    }
}

/// The prompt encoder of `prepared`'s base (what [`amalgam::moe::build`] asks for): errors
/// name the config (a base given as `+adapter`, which this forward does not apply) or the base.
pub fn encoder_for(
    prepared: &amalgam::moe::Prepared,
    progress: Box<dyn FnMut(usize) + Send>,
) -> amalgam::Result<Box<dyn PromptEncoder>> {
    if prepared.set.adapters[0].is_some() {
        return Err(prepared.config.error(format!(
            "gate_mode {} runs the base model, and a base_model with +adapter is not supported there; bake the adapter with `amalgam lora apply` first",
            prepared.config.gate_mode.name()
        )));
    }
    let path = &prepared.set.models[0].path;
    let enc = BaseEncoder::open(path, progress).map_err(|e| {
        amalgam::Error::argument(format!("base model {}", path.display()), e.to_string())
    })?;
    Ok(Box::new(enc))
}

impl BaseEncoder {
    fn error(&self, e: Error) -> amalgam::Error {
        amalgam::Error::argument(format!("base model {}", self.path.display()), e.to_string())
    }
}

impl PromptEncoder for BaseEncoder {
    fn encode(&mut self, prompts: &[String], mode: GateMode) -> amalgam::Result<Vec<Vec<f32>>> {
        if let Some(v) = self.cache.get(prompts) {
            return Ok(v.clone());
        }
        let mut v = self
            .encode_sets(&[prompts], mode)
            .map_err(|e| self.error(e))?;
        Ok(v.remove(0))
    }

    fn prepare(&mut self, sets: &[&[String]], mode: GateMode) -> amalgam::Result<()> {
        let vectors = self.encode_sets(sets, mode).map_err(|e| self.error(e))?;
        for (set, v) in sets.iter().zip(vectors) {
            self.cache.insert(set.to_vec(), v);
        }
        Ok(())
    }
}
