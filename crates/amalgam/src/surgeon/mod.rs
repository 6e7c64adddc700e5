//! Token surgery (`amalgam tokensurgeon MODEL DONOR OUT`, mergekit-tokensurgeon 0.1.5's
//! algorithm): give MODEL the DONOR's tokenizer. Every vocabulary matrix of MODEL (input
//! embeddings, LM head) is rebuilt with one row per donor token: a token MODEL has (compared as
//! [`tokens`] normalises them) keeps its row, bit for bit; optionally a byte token or a prefix
//! of the token stands in; every other token is approximated from the tokens both have, by
//! orthogonal matching pursuit over the donor's rows (the default, [`omp`]), the model's mean
//! row, zeros, the mean of the model's subword rows, or nearest-neighbour interpolation
//! ([`interp`]). The coefficients found in the donor's space are applied to the model's rows of
//! the same tokens, so the two hidden sizes may differ. Every other tensor is copied.
//!
//! The output directory gets MODEL's config with the new `vocab_size` and the donor's
//! bos/eos/pad (and unk/mask/padding side) token ids, and the donor's tokenizer files as they
//! are. Where amalgam departs from mergekit 0.1.5 it is on purpose, and documented on the
//! option: `--prefix-match embed` means the embeddings (mergekit swaps `embed` and `lm_head`),
//! tensors outside mergekit's architecture tables are kept, and a tokenizer of an unknown
//! class gets the word-start marker its pipeline uses.

pub mod interp;
pub mod magikarp;
pub mod matrix;
pub mod omp;
pub mod tokens;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::arch::{self, Place};
use crate::dtype::{DType, encode_f32};
use crate::error::{Error, IoContext, Result};
use crate::io::Model;
use crate::io::modeldir;
use crate::io::writer::{Existing, ModelWriter, TensorSpec};
use crate::progress::Progress;
pub use interp::Weighting;
use matrix::{Dict, Matrix};
use tokens::{Key, Vocab};

/// How a token the model lacks gets its row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Orthogonal matching pursuit with `k` atoms over the shared tokens' donor rows.
    Omp,
    /// The mean of all the model's rows.
    Mean,
    /// Zeros.
    Zero,
    /// From the model's rows of the token's subwords in the model's tokenizer.
    Subword(Subword),
    /// The `k` nearest shared tokens by the donor's rows, weighted.
    CommonInterpolation {
        /// Distance `1 − cos` instead of euclidean.
        cosine: bool,
        /// How the neighbours are weighted.
        weighting: Weighting,
    },
}

impl Method {
    /// The name mergekit's `-a` gives it.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Omp => "omp",
            Method::Mean => "mean",
            Method::Zero => "zero",
            Method::Subword(_) => "subword",
            Method::CommonInterpolation { .. } => "common_interpolation",
        }
    }
}

/// How subword rows combine (mergekit's `--subword-method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subword {
    /// Their mean.
    Mean,
    /// Their sum.
    Sum,
    /// Weights 1..n: the last subword heaviest for the embeddings, the first for the LM head.
    WeightedMean,
    /// The last subword's row for the embeddings, the first's for the LM head.
    FirstLast,
}

/// Which matrices a byte or prefix match applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatchOn {
    /// Neither.
    #[default]
    No,
    /// Both.
    Yes,
    /// The input embeddings only.
    Embed,
    /// The LM head only.
    LmHead,
}

impl MatchOn {
    fn applies(self, lm_head: bool) -> bool {
        match self {
            MatchOn::No => false,
            MatchOn::Yes => true,
            MatchOn::Embed => !lm_head,
            MatchOn::LmHead => lm_head,
        }
    }
}

/// Token surgery settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// The approximation.
    pub method: Method,
    /// Atoms (omp) or neighbours (common_interpolation).
    pub k: usize,
    /// Where a byte token may stand in for a character and the reverse.
    pub byte_match: MatchOn,
    /// Where the longest known prefix may stand in.
    pub prefix_match: MatchOn,
    /// Zero under-trained tokens and keep them out of the shared set ([`magikarp`]).
    pub magikarp: bool,
    /// Multiply approximated rows by this (mergekit's `--new-vocab-scale`).
    pub scale: Option<f64>,
    /// Largest shard in bytes (`None`: one file).
    pub shard_size: Option<u64>,
    /// What to do with an existing output.
    pub existing: Existing,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            method: Method::Omp,
            k: 64,
            byte_match: MatchOn::No,
            prefix_match: MatchOn::No,
            magikarp: false,
            scale: None,
            shard_size: None,
            existing: Existing::Refuse,
        }
    }
}

/// Tokenizes text with the model's tokenizer, no special tokens added (for
/// [`Method::Subword`]); the binary supplies it, as the library does not link a tokenizer.
pub trait Encode: Sync {
    /// Token ids of `text`.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
}

/// What happened to one vocabulary matrix.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    /// Tensor name.
    pub name: String,
    /// Rows written.
    pub rows: usize,
    /// Tokens both vocabularies have (the dictionary of omp and common_interpolation).
    pub shared: usize,
    /// Rows copied from the model's row of the same token.
    pub exact: usize,
    /// Rows copied from a byte token's row.
    pub byte: usize,
    /// Rows copied from a prefix's row.
    pub prefix: usize,
    /// Rows approximated.
    pub approximated: usize,
    /// Rows zeroed: donor ids past the donor's rows and, with magikarp, under-trained tokens.
    pub junk: usize,
}

/// What `run` did.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The output directory.
    pub output: PathBuf,
    /// The approximation's name.
    pub method: &'static str,
    /// The new vocabulary size.
    pub vocab_size: usize,
    /// How each tokenizer's word-start marker was chosen.
    pub markers: [String; 2],
    /// Per vocabulary matrix.
    pub tensors: Vec<TensorReport>,
    /// Other tensors copied.
    pub copied: usize,
}

/// The input-embedding and LM-head names of a model (either may be absent, not both).
fn vocab_tensors(m: &Model) -> Result<(Option<String>, Option<String>)> {
    let (mut pre, mut post) = (Vec::new(), Vec::new());
    for t in m.tensors() {
        if arch::is_vocabulary(&t.name) {
            match arch::place(&t.name) {
                Place::Post => post.push(t.name.clone()),
                _ => pre.push(t.name.clone()),
            }
        }
    }
    let one = |v: Vec<String>, what: &str| -> Result<Option<String>> {
        if v.len() > 1 {
            return Err(Error::NotAModel {
                path: m.path.clone(),
                reason: format!(
                    "more than one {what} tensor ({}); tokensurgeon needs one",
                    v.join(", ")
                ),
            });
        }
        Ok(v.into_iter().next())
    };
    let pair = (one(pre, "input embedding")?, one(post, "LM head")?);
    if pair.0.is_none() && pair.1.is_none() {
        return Err(Error::NotAModel {
            path: m.path.clone(),
            reason: "no vocabulary matrix (embed_tokens/wte/word_embeddings, lm_head/embed_out)"
                .into(),
        });
    }
    Ok(pair)
}

/// Give `model` the tokenizer of `donor`, writing the result to `output`.
pub fn run(
    model_path: &Path,
    donor_path: &Path,
    output: &Path,
    opts: &Options,
    encoder: Option<&dyn Encode>,
    progress: &dyn Progress,
) -> Result<Report> {
    if let Some(s) = opts.scale
        && !(s.is_finite())
    {
        return Err(Error::InvalidArgument {
            what: "new-vocab-scale".into(),
            reason: format!("{s} is not a finite number"),
        });
    }
    if matches!(
        opts.method,
        Method::Omp | Method::CommonInterpolation { .. }
    ) && opts.k == 0
    {
        return Err(Error::InvalidArgument {
            what: "k".into(),
            reason: "must be at least 1".into(),
        });
    }
    let model = Model::open(model_path)?;
    let donor = Model::open(donor_path)?;
    let mv = Vocab::open(&model.dir)?;
    let dv = Vocab::open(&donor.dir)?;
    let (m_embed, m_head) = vocab_tensors(&model)?;
    let (d_embed, d_head) = vocab_tensors(&donor)?;
    let missing = |what: &str| Error::MissingTensor {
        path: donor.path.clone(),
        name: format!("{what} (the model has one, so the donor needs one)"),
    };
    let m_embed = m_embed.map(|n| Matrix::open(&model, &n)).transpose()?;
    let m_head = m_head.map(|n| Matrix::open(&model, &n)).transpose()?;
    let d_embed_m = d_embed
        .as_deref()
        .map(|n| Matrix::open(&donor, n))
        .transpose()?;
    // A donor without an LM head ties it to its embeddings (mergekit reads the tied alias).
    let d_head_m = d_head
        .as_deref()
        .or(d_embed.as_deref())
        .map(|n| Matrix::open(&donor, n))
        .transpose()?;
    if m_embed.is_some() && d_embed_m.is_none() {
        return Err(missing("input embeddings"));
    }
    if dv.ids.is_empty() {
        return Err(Error::Config {
            path: dv.dir.join("tokenizer.json"),
            reason: "the donor's tokenizer has no tokens".into(),
        });
    }
    let out_rows = dv
        .ids
        .len()
        .max(dv.ids.values().max().map_or(0, |&m| m as usize + 1));

    let mut orig = mv.ids.clone();
    let mut junk: Vec<u32> = Vec::new();
    if opts.magikarp {
        let (Some(me), Some(de)) = (&m_embed, &d_embed_m) else {
            return Err(Error::InvalidArgument {
                what: "magikarp".into(),
                reason: "needs input embeddings in both models".into(),
            });
        };
        let good_m = magikarp::well_trained(&mv.ids, me, m_head.as_ref())?;
        let good_d = magikarp::well_trained(&dv.ids, de, d_head_m.as_ref())?;
        orig.retain(|k, _| good_m.contains(k) && good_d.contains(k));
        junk = dv
            .by_id()
            .into_iter()
            .filter(|(k, _)| !good_d.contains(*k) && !good_m.contains(*k))
            .map(|(_, i)| i)
            .collect();
    }

    let mut specs: Vec<TensorSpec> = Vec::new();
    let mut jobs: Vec<Option<(bool, usize)>> = Vec::new();
    let mats = [m_embed.as_ref(), m_head.as_ref()];
    for e in model.tensors() {
        let which = mats
            .iter()
            .position(|m| m.is_some_and(|m| m.name == e.name));
        let mut spec = TensorSpec::from(e);
        if let Some(w) = which {
            spec.shape[0] = out_rows;
            jobs.push(Some((w == 1, w)));
        } else {
            jobs.push(None);
        }
        specs.push(spec);
    }
    let mut builds = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        if let Some((is_head, w)) = job {
            let m = mats[*w].expect("job of a present matrix");
            let d = if *is_head {
                d_head_m.as_ref()
            } else {
                d_embed_m.as_ref()
            }
            .ok_or_else(|| {
                missing(if *is_head {
                    "LM head"
                } else {
                    "input embeddings"
                })
            })?;
            builds.push((
                i,
                Build {
                    m,
                    d,
                    orig: &orig,
                    donor: &dv,
                    junk: &junk,
                    is_head: *is_head,
                    out_rows,
                    opts,
                    encoder,
                },
            ));
        }
    }
    let plans = builds
        .iter()
        .map(|(_, b)| b.plan())
        .collect::<Result<Vec<_>>>()?;
    let writer = ModelWriter::create(output, specs, opts.shard_size, opts.existing)?;
    let mut copied = 0;
    for (i, job) in jobs.iter().enumerate() {
        crate::cancel::check()?;
        if job.is_none() {
            let name = &writer.specs()[i].name;
            writer.write(i, model.tensor(name)?.bytes)?;
            model.release(name);
            copied += 1;
        }
    }
    let mut reports = Vec::new();
    for ((i, b), plan) in builds.iter().zip(plans) {
        reports.push(b.write(plan, &writer, *i, progress)?);
    }
    write_side_files(&model, &donor, writer.staging_dir(), out_rows)?;
    let output = writer.finish()?;
    Ok(Report {
        output,
        method: opts.method.name(),
        vocab_size: out_rows,
        markers: [
            format!("model: '{}' ({})", mv.marker, mv.marker_reason),
            format!("donor: '{}' ({})", dv.marker, dv.marker_reason),
        ],
        tensors: reports,
        copied,
    })
}

/// Where an output row comes from.
#[derive(Clone, Copy)]
enum Src {
    Copy(u32),
    New(usize),
    Zero,
}

/// One vocabulary matrix to rebuild.
struct Build<'a> {
    m: &'a Matrix<'a>,
    d: &'a Matrix<'a>,
    orig: &'a HashMap<Key, u32>,
    donor: &'a Vocab,
    junk: &'a [u32],
    is_head: bool,
    out_rows: usize,
    opts: &'a Options,
    encoder: Option<&'a dyn Encode>,
}

/// A matrix's rows planned: each row's source, the tokens to approximate (token, donor id),
/// the shared tokens (token, donor id), and the counts.
struct Plan<'a> {
    srcs: Vec<Src>,
    new: Vec<(&'a Key, u32)>,
    shared: Vec<(&'a Key, u32)>,
    rep: TensorReport,
}

/// New tokens approximated per pass (bounds the targets held at once).
const CHUNK: usize = 4096;

impl Build<'_> {
    /// Where every output row comes from, checked before anything is written.
    fn plan(&self) -> Result<Plan<'_>> {
        let (m, d) = (self.m, self.d);
        // The model's tokens that have a row (mergekit's `safe_orig_vocab`).
        let lookup: HashMap<Key, u32> = self
            .orig
            .iter()
            .filter(|(_, i)| (**i as usize) < m.rows)
            .map(|(k, &i)| (k.clone(), i))
            .collect();
        let donor_entries = self.donor.by_id();
        let mut junk: HashSet<u32> = self.junk.iter().copied().collect();
        junk.extend(
            donor_entries
                .iter()
                .map(|e| e.1)
                .filter(|&i| i as usize >= d.rows),
        );

        let mut srcs = vec![Src::Zero; self.out_rows];
        let mut new: Vec<(&Key, u32)> = Vec::new();
        let mut rep = TensorReport {
            name: m.name.clone(),
            rows: self.out_rows,
            shared: 0,
            exact: 0,
            byte: 0,
            prefix: 0,
            approximated: 0,
            junk: 0,
        };
        let byte_on = self.opts.byte_match.applies(self.is_head);
        let prefix_on = self.opts.prefix_match.applies(self.is_head);
        for &(key, id) in &donor_entries {
            if id as usize >= d.rows {
                continue;
            }
            let src = if let Some(&j) = lookup.get(key) {
                rep.exact += 1;
                Src::Copy(j)
            } else if let Some(j) = byte_on.then(|| tokens::byte_match(key, &lookup)).flatten() {
                rep.byte += 1;
                Src::Copy(j)
            } else if let Some(j) = prefix_on
                .then(|| tokens::prefix_match(key, &lookup))
                .flatten()
            {
                rep.prefix += 1;
                Src::Copy(j)
            } else {
                rep.approximated += 1;
                new.push((key, id));
                Src::New(new.len() - 1)
            };
            srcs[id as usize] = src;
        }
        // Junk rows are zeroed last, over any match (as mergekit does).
        for &j in &junk {
            if (j as usize) < self.out_rows {
                srcs[j as usize] = Src::Zero;
            }
        }
        rep.junk = junk.len();
        // Shared tokens by donor id: the dictionary of omp and common_interpolation.
        let shared: Vec<(&Key, u32)> = donor_entries
            .iter()
            .filter(|e| (e.1 as usize) < d.rows && lookup.contains_key(e.0))
            .copied()
            .collect();
        rep.shared = shared.len();
        let any_new = srcs.iter().any(|s| matches!(s, Src::New(_)));
        if any_new
            && matches!(
                self.opts.method,
                Method::Omp | Method::CommonInterpolation { .. }
            )
            && self.opts.k > shared.len()
        {
            return Err(Error::InvalidArgument {
                what: "k".into(),
                reason: format!(
                    "{} needs {} shared tokens for '{}' but the vocabularies share {}; lower -k",
                    self.opts.method.name(),
                    self.opts.k,
                    m.name,
                    shared.len()
                ),
            });
        }
        if any_new && matches!(self.opts.method, Method::Subword(_)) && self.encoder.is_none() {
            return Err(Error::InvalidArgument {
                what: "approximation method".into(),
                reason: "subword needs the model's tokenizer, which this build of amalgam does \
                         not include (build with the eval feature)"
                    .into(),
            });
        }
        Ok(Plan {
            srcs,
            new,
            shared,
            rep,
        })
    }

    /// Write the rows of `plan` into tensor `index` of `writer`.
    fn write(
        &self,
        plan: Plan<'_>,
        writer: &ModelWriter,
        index: usize,
        progress: &dyn Progress,
    ) -> Result<TensorReport> {
        let Plan {
            srcs,
            new,
            shared,
            rep,
        } = plan;
        let m = self.m;
        let row_bytes = m.row_bytes();
        let zero = vec![0u8; row_bytes];
        for (id, s) in srcs.iter().enumerate() {
            let bytes = match s {
                Src::Copy(j) => m.raw(*j as usize),
                Src::Zero => &zero[..],
                Src::New(_) => continue,
            };
            writer.write_part(index, (id * row_bytes) as u64, bytes)?;
        }
        // Rows still to compute: approximated tokens that are not junk.
        let todo: Vec<(usize, u32)> = srcs
            .iter()
            .enumerate()
            .filter_map(|(id, s)| match s {
                Src::New(n) => Some((*n, id as u32)),
                _ => None,
            })
            .collect();
        if todo.is_empty() {
            return Ok(rep);
        }
        let approx = Approx::new(self, &shared)?;
        progress.stage(&format!(
            "{}: {} tokens by {}",
            m.name,
            todo.len(),
            self.opts.method.name()
        ));
        progress.start(1, (todo.len() * row_bytes) as u64);
        let mut bytes = Vec::new();
        for chunk in todo.chunks(CHUNK) {
            crate::cancel::check()?;
            let keys: Vec<(&Key, u32)> = chunk.iter().map(|&(n, _)| new[n]).collect();
            let rows = approx.rows(self, &keys)?;
            for (&(_, id), mut row) in chunk.iter().zip(rows) {
                if let Some(s) = self.opts.scale {
                    row.iter_mut().for_each(|x| *x *= s);
                }
                if m.dtype == DType::F64 {
                    bytes.clear();
                    bytes.extend(row.iter().flat_map(|x| x.to_le_bytes()));
                } else {
                    let f: Vec<f32> = row.iter().map(|&x| x as f32).collect();
                    encode_f32(m.dtype, &f, &mut bytes);
                }
                writer.write_part(index, id as u64 * row_bytes as u64, &bytes)?;
            }
            progress.advance((chunk.len() * row_bytes) as u64);
        }
        progress.finish();
        progress.stage("");
        Ok(rep)
    }
}

/// The data an approximation needs, prepared once per matrix.
enum Approx {
    Basis {
        /// Donor rows of the shared tokens.
        dict: Dict,
        /// Model row ids of the shared tokens.
        atoms: Vec<u32>,
    },
    Mean(Vec<f64>),
    Zero,
    Subword,
}

impl Approx {
    fn new(b: &Build<'_>, shared: &[(&Key, u32)]) -> Result<Approx> {
        Ok(match b.opts.method {
            Method::Omp | Method::CommonInterpolation { .. } => {
                let donor_ids: Vec<u32> = shared.iter().map(|e| e.1).collect();
                Approx::Basis {
                    dict: b.d.gather(&donor_ids)?,
                    atoms: shared.iter().map(|e| b.orig[e.0]).collect(),
                }
            }
            Method::Mean => Approx::Mean(b.m.mean()?),
            Method::Zero => Approx::Zero,
            Method::Subword(_) => Approx::Subword,
        })
    }

    /// Rows (model width) for `keys` (token, donor id).
    fn rows(&self, b: &Build<'_>, keys: &[(&Key, u32)]) -> Result<Vec<Vec<f64>>> {
        let cols = b.m.cols;
        match self {
            Approx::Zero => Ok(vec![vec![0.0; cols]; keys.len()]),
            Approx::Mean(mean) => Ok(vec![mean.clone(); keys.len()]),
            Approx::Subword => keys.iter().map(|(k, _)| subword(b, k)).collect(),
            Approx::Basis { dict, atoms } => {
                let targets = keys
                    .iter()
                    .map(|&(_, id)| b.d.row_f64(id as usize))
                    .collect::<Result<Vec<_>>>()?;
                let fits: Vec<(Vec<usize>, Vec<f64>)> = match (b.opts.method, dict) {
                    (Method::Omp, Dict::F32(r)) => omp_fits(omp::omp(targets, r, b.opts.k)),
                    (Method::Omp, Dict::F64(r)) => omp_fits(omp::omp(targets, r, b.opts.k)),
                    (Method::CommonInterpolation { cosine, weighting }, dict) => {
                        let f = match dict {
                            Dict::F32(r) => {
                                interp::interp(&targets, r, b.opts.k, cosine, weighting)
                            }
                            Dict::F64(r) => {
                                interp::interp(&targets, r, b.opts.k, cosine, weighting)
                            }
                        };
                        f.into_iter().map(|f| (f.picked, f.weights)).collect()
                    }
                    _ => unreachable!("basis data only for omp and common_interpolation"),
                };
                fits.into_iter()
                    .map(|(picked, coeffs)| {
                        let mut row = vec![0.0; cols];
                        for (&j, &c) in picked.iter().zip(&coeffs) {
                            let atom = b.m.row_f64(atoms[j] as usize)?;
                            row.iter_mut().zip(atom).for_each(|(r, a)| *r += c * a);
                        }
                        Ok(row)
                    })
                    .collect()
            }
        }
    }
}

fn omp_fits(f: Vec<omp::Fit>) -> Vec<(Vec<usize>, Vec<f64>)> {
    f.into_iter().map(|f| (f.picked, f.coeffs)).collect()
}

/// mergekit's `subword_approximate` for one token.
fn subword(b: &Build<'_>, key: &Key) -> Result<Vec<f64>> {
    let Method::Subword(how) = b.opts.method else {
        unreachable!("subword rows only for the subword method")
    };
    let encoder = b.encoder.expect("checked in Approx::new");
    let text = key.text();
    let ids = encoder.encode(&text)?;
    let mut rows = Vec::with_capacity(ids.len());
    for &i in &ids {
        if i as usize >= b.m.rows {
            return Err(Error::Config {
                path: b.m.name.clone().into(),
                reason: format!(
                    "the model's tokenizer gives token id {i} for '{text}' but '{}' has {} rows",
                    b.m.name, b.m.rows
                ),
            });
        }
        rows.push(b.m.row_f64(i as usize)?);
    }
    let mut out = vec![0.0; b.m.cols];
    if rows.is_empty() {
        return Ok(out);
    }
    let n = rows.len();
    match how {
        Subword::Mean | Subword::Sum => {
            for r in &rows {
                out.iter_mut().zip(r).for_each(|(o, x)| *o += x);
            }
            if how == Subword::Mean {
                out.iter_mut().for_each(|o| *o /= n as f64);
            }
        }
        Subword::WeightedMean => {
            let total = (n * (n + 1) / 2) as f64;
            for (i, r) in rows.iter().enumerate() {
                // Weights 1..n; reversed for the embeddings (the last subword weighs n).
                let w = if b.is_head { i + 1 } else { n - i } as f64;
                out.iter_mut().zip(r).for_each(|(o, x)| *o += w * x);
            }
            out.iter_mut().for_each(|o| *o /= total);
        }
        Subword::FirstLast => {
            out = if b.is_head {
                rows[0].clone()
            } else {
                rows[n - 1].clone()
            };
        }
    }
    Ok(out)
}

fn read_config(dir: &Path, name: &str) -> Result<Option<Value>> {
    tokens::read_json(&dir.join(name))
}

fn write_json(dir: &Path, name: &str, v: &Value) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(v).expect("json")).at(&path)
}

/// Token-id keys a config takes from the donor: always (null when the donor has none), and
/// when the donor has them (mergekit's `hasattr` on a transformers 5 LlamaConfig).
const DONOR_IDS_ALWAYS: &[&str] = &["pad_token_id", "eos_token_id", "bos_token_id"];
const DONOR_IDS_IF_SET: &[&str] = &["unk_token_id", "mask_token_id", "padding_side"];

/// MODEL's config with the new vocabulary size and the donor's special-token ids, its
/// generation config with the same ids, and the donor's tokenizer files.
fn write_side_files(model: &Model, donor: &Model, dir: &Path, vocab_size: usize) -> Result<()> {
    let donor_cfg = read_config(&donor.dir, "config.json")?.unwrap_or(Value::Null);
    let donor_id = |k: &str| donor_cfg.get(k).cloned();
    if let Some(mut cfg) = read_config(&model.dir, "config.json")?
        && let Some(obj) = cfg.as_object_mut()
    {
        let nested = !obj.contains_key("vocab_size")
            && obj
                .get("text_config")
                .is_some_and(|t| t.get("vocab_size").is_some());
        let target = if nested {
            obj.get_mut("text_config")
                .and_then(Value::as_object_mut)
                .expect("checked")
        } else {
            obj
        };
        target.insert("vocab_size".into(), vocab_size.into());
        for k in DONOR_IDS_ALWAYS {
            target.insert((*k).into(), donor_id(k).unwrap_or(Value::Null));
        }
        for k in DONOR_IDS_IF_SET {
            if let Some(v) = donor_id(k) {
                target.insert((*k).into(), v);
            }
        }
        write_json(dir, "config.json", &cfg)?;
    }
    if let Some(mut gen_cfg) = read_config(&model.dir, "generation_config.json")?
        && let Some(obj) = gen_cfg.as_object_mut()
    {
        let donor_gen = read_config(&donor.dir, "generation_config.json")?.unwrap_or(Value::Null);
        for k in DONOR_IDS_ALWAYS {
            if obj.contains_key(*k) {
                let v = donor_gen
                    .get(*k)
                    .cloned()
                    .or_else(|| donor_id(k))
                    .unwrap_or(Value::Null);
                obj.insert((*k).into(), v);
            }
        }
        write_json(dir, "generation_config.json", &gen_cfg)?;
    }
    modeldir::copy_present(&donor.dir, dir, modeldir::TOKENIZER_FILES)?;
    Ok(())
}
