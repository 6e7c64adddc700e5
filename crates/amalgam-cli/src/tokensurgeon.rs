//! `amalgam tokensurgeon`: give a model another model's tokenizer.

use std::io::Write;
use std::path::PathBuf;

use amalgam::surgeon::{self, MatchOn, Method, Subword, Weighting};
use anyhow::{Result, bail};

/// Arguments of `amalgam tokensurgeon` (mergekit-tokensurgeon's options and defaults).
#[derive(clap::Args)]
pub struct SurgeonArgs {
    /// The model whose weights are kept (a model directory, .safetensors or .gguf).
    model: PathBuf,
    /// The model whose tokenizer MODEL gets.
    donor: PathBuf,
    /// Output model directory.
    output: PathBuf,
    /// How rows of tokens MODEL lacks are built: omp (orthogonal matching pursuit over the
    /// shared tokens), mean (MODEL's mean row), zero, subword (from MODEL's rows of the
    /// token's pieces in MODEL's tokenizer), common_interpolation (the k nearest shared
    /// tokens).
    #[arg(short = 'a', long, default_value = "omp", value_parser = parse_method)]
    approximation_method: String,
    /// Atoms per token (omp) or neighbours (common_interpolation).
    #[arg(short = 'k', long, default_value_t = 64)]
    k: usize,
    /// common_interpolation: distance 1 − cosine similarity instead of euclidean.
    #[arg(short = 'c', long)]
    cosine_similarity: bool,
    /// common_interpolation: distance_proportional, barycentric or least_squares.
    #[arg(short = 'w', long, default_value = "distance_proportional",
          value_parser = ["distance_proportional", "barycentric", "least_squares"])]
    weight_scheme: String,
    /// subword: mean, sum, weighted_mean (later pieces heavier for the embeddings, earlier
    /// for the LM head) or first_last (the last piece for the embeddings, the first for the
    /// LM head).
    #[arg(short = 's', long, default_value = "mean",
          value_parser = ["mean", "sum", "weighted_mean", "first_last"])]
    subword_method: String,
    /// Let the longest prefix MODEL has stand in for a token it lacks: no, yes, embed (the
    /// input embeddings only) or lm_head (the LM head only). mergekit 0.1.5 swaps the last
    /// two (its `-pm lm_head` acts on the embeddings); amalgam's mean what they say.
    #[arg(long, visible_alias = "pm", default_value = "no", value_parser = parse_match)]
    prefix_match: MatchOn,
    /// Let a byte token `<0xNN>` stand in for the character U+00NN and the reverse: no, yes,
    /// embed or lm_head (mergekit 0.1.5 swaps the last two).
    #[arg(long, visible_alias = "bm", default_value = "no", value_parser = parse_match)]
    byte_match: MatchOn,
    /// Find under-trained tokens in both models (unused ids, low-norm and unused-like rows),
    /// keep them out of the shared set, and zero their rows.
    #[arg(long)]
    magikarp: bool,
    /// Multiply approximated rows by this.
    #[arg(long, visible_alias = "nvs", allow_negative_numbers = true)]
    new_vocab_scale: Option<f64>,
    /// Largest shard, mergekit's syntax: bytes, or a number with K, M, B (10^9): 5B, 500M.
    #[arg(long, value_parser = crate::parse_size)]
    out_shard_size: Option<u64>,
    /// Replace OUTPUT if it exists (only once the new model is complete).
    #[arg(long)]
    overwrite: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_method(s: &str) -> std::result::Result<String, String> {
    match s {
        "omp" | "mean" | "zero" | "subword" | "common_interpolation" => Ok(s.to_string()),
        "randn" | "john_hewitt" | "landmark_pca" | "mp_rope" | "stb" => Err(format!(
            "'{s}' is one of mergekit's experimental methods amalgam does not offer (random \
             rows, torch's randomized PCA, or code that fails in mergekit 0.1.5); use omp, mean, \
             zero, subword or common_interpolation"
        )),
        _ => Err(format!(
            "unknown method '{s}'; use omp, mean, zero, subword or common_interpolation"
        )),
    }
}

fn parse_match(s: &str) -> std::result::Result<MatchOn, String> {
    Ok(match s {
        "no" => MatchOn::No,
        "yes" => MatchOn::Yes,
        "embed" => MatchOn::Embed,
        "lm_head" => MatchOn::LmHead,
        _ => return Err(format!("'{s}': use no, yes, embed or lm_head")),
    })
}

/// The model's tokenizer, for the subword method.
#[cfg(feature = "eval")]
struct HfEncoder(tokenizers::Tokenizer, PathBuf);

#[cfg(feature = "eval")]
impl surgeon::Encode for HfEncoder {
    fn encode(&self, text: &str) -> amalgam::Result<Vec<u32>> {
        let e = self
            .0
            .encode(text, false)
            .map_err(|e| amalgam::Error::Config {
                path: self.1.clone(),
                reason: format!("cannot tokenize {text:?}: {e}"),
            })?;
        Ok(e.get_ids().to_vec())
    }
}

#[cfg(feature = "eval")]
fn encoder(args: &SurgeonArgs) -> Result<Option<HfEncoder>> {
    if args.approximation_method != "subword" {
        return Ok(None);
    }
    let dir = amalgam::io::Model::open(&args.model)?.dir;
    let path = dir.join("tokenizer.json");
    let t = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", path.display()))?;
    Ok(Some(HfEncoder(t, path)))
}

/// Run `amalgam tokensurgeon`.
pub fn run(args: SurgeonArgs, quiet: bool) -> Result<()> {
    let method = match args.approximation_method.as_str() {
        "omp" => Method::Omp,
        "mean" => Method::Mean,
        "zero" => Method::Zero,
        "subword" => Method::Subword(match args.subword_method.as_str() {
            "mean" => Subword::Mean,
            "sum" => Subword::Sum,
            "weighted_mean" => Subword::WeightedMean,
            _ => Subword::FirstLast,
        }),
        "common_interpolation" => Method::CommonInterpolation {
            cosine: args.cosine_similarity,
            weighting: match args.weight_scheme.as_str() {
                "distance_proportional" => Weighting::DistanceProportional,
                "barycentric" => Weighting::Barycentric,
                _ => Weighting::LeastSquares,
            },
        },
        other => bail!("unknown method '{other}'"),
    };
    let opts = surgeon::Options {
        method,
        k: args.k,
        byte_match: args.byte_match,
        prefix_match: args.prefix_match,
        magikarp: args.magikarp,
        scale: args.new_vocab_scale,
        shard_size: args.out_shard_size,
        existing: crate::existing(args.overwrite),
    };
    #[cfg(feature = "eval")]
    let enc = encoder(&args)?;
    #[cfg(feature = "eval")]
    let enc_ref = enc.as_ref().map(|e| e as &dyn surgeon::Encode);
    #[cfg(not(feature = "eval"))]
    let enc_ref: Option<&dyn surgeon::Encode> = None;
    let bar = crate::progress::Bar::new("tokensurgeon", quiet);
    let report = surgeon::run(&args.model, &args.donor, &args.output, &opts, enc_ref, &bar)?;
    if args.json {
        return crate::print_json(&report);
    }
    let mut out = std::io::stdout().lock();
    for t in &report.tensors {
        writeln!(
            out,
            "{}: {} rows: {} exact, {} byte, {} prefix, {} approximated by {}, {} zeroed (junk); {} shared tokens",
            t.name,
            t.rows,
            t.exact,
            t.byte,
            t.prefix,
            t.approximated,
            report.method,
            t.junk,
            t.shared
        )?;
    }
    writeln!(
        out,
        "word-start markers: {}; {}",
        report.markers[0], report.markers[1]
    )?;
    writeln!(
        out,
        "wrote {} (vocab_size {}, {} other tensors copied)",
        report.output.display(),
        report.vocab_size,
        report.copied
    )?;
    Ok(())
}
