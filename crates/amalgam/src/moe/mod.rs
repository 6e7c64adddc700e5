//! `amalgam moe`: a mixture-of-experts model from dense fine-tunes of one base, as mergekit-moe
//! 0.1.5 builds it (its YAML, its tensors), streamed like `merge`.
//!
//! Data flows one way: the config ([`config`]) and the input headers become a plan of output
//! tensors ([`prepare`]: every tensor with the parts it is assembled from); the router weights
//! are computed ([`gates`], whose forward passes come from the evaluation crate through
//! [`gates::PromptEncoder`]); then [`write`] streams each part from its model into its place in
//! the output. Attention, norms, embeddings and the LM head come from the base, every expert
//! slot's MLP from one expert model.

pub mod config;
pub mod gates;
pub mod layout;
mod write;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

pub use config::{ExpertConfig, GateMode, MoeConfig};
pub use gates::{Gates, PromptEncoder};
pub use layout::{Layout, OutArch};
pub use write::{MoeOptions, write};

use crate::config::ModelRef;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::{Input, ModelSet};

/// The MLP projections of a dense layer, in mergekit's order.
pub const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// One piece of an output tensor: a whole input tensor, placed at element `offset`.
#[derive(Clone, Debug)]
pub struct Part {
    /// Where it is read from.
    pub input: Input,
    /// Its first element's index in the output tensor.
    pub offset: usize,
    /// Elements.
    pub len: usize,
    /// Standard deviation of the Gaussian noise added to it (the expert's `noise_scale`).
    pub noise: Option<f64>,
    /// Factor it is multiplied by after the noise (`residual_scale`, on `down_proj`).
    pub scale: Option<f64>,
    /// The expert slot, for the noise's random stream.
    pub slot: usize,
}

/// How an output tensor is made.
#[derive(Clone, Debug)]
pub enum Make {
    /// Assembled from input tensors.
    Parts(Vec<Part>),
    /// Router rows `experts` of layer `layer` of the [`Gates`].
    Router {
        /// The layer.
        layer: usize,
        /// Which gated experts' rows.
        experts: std::ops::Range<usize>,
    },
    /// Zeros (Qwen2-MoE's q/k/v biases for a base without them, as mergekit writes them).
    Zeros,
}

/// One output tensor.
#[derive(Clone, Debug)]
pub struct OutTensor {
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its dtype.
    pub dtype: DType,
    /// How it is made.
    pub make: Make,
}

impl OutTensor {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Options for [`prepare`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PrepareOptions {
    /// The expert layout to write.
    pub layout: Layout,
    /// Allow every expert to be the same model (mergekit's
    /// `--i-understand-this-is-not-useful-without-training`).
    pub allow_identical: bool,
}

/// A checked MoE build: the config, its models, the output architecture and every output
/// tensor with its sources.
pub struct Prepared {
    /// The config.
    pub config: MoeConfig,
    /// The models: the base first, then each other model once.
    pub set: ModelSet,
    /// The output architecture.
    pub arch: OutArch,
    /// The expert layout.
    pub layout: Layout,
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// The output tensors, in write order.
    pub tensors: Vec<OutTensor>,
    /// The output `config.json`.
    pub out_config: Value,
    /// Notices for the user (mergekit's warnings).
    pub warnings: Vec<String>,
}

/// Read `config_path`, open its models and plan every output tensor; nothing is computed or
/// written. Errors name the expert and tensor at fault.
pub fn prepare(config_path: &Path, opts: PrepareOptions) -> Result<Prepared> {
    let config = MoeConfig::load(config_path)?;
    config.validate(opts.allow_identical)?;
    let mut refs: Vec<ModelRef> = Vec::new();
    let mut index = HashMap::new();
    let mut add = |r: &str| -> usize {
        *index.entry(r.to_string()).or_insert_with(|| {
            refs.push(ModelRef(r.to_string()));
            refs.len() - 1
        })
    };
    add(&config.base_model);
    let experts: Vec<usize> = config
        .experts
        .iter()
        .map(|e| add(&e.source_model))
        .collect();
    let shared: Vec<usize> = config
        .shared()
        .iter()
        .map(|e| add(&e.source_model))
        .collect();
    let set = ModelSet::open_refs(refs, |reason| config.error(reason))?;
    let named = config.all_experts();
    let base_name = format!("base_model ({})", config.base_model);
    let who: Vec<(&str, usize)> = std::iter::once((base_name.as_str(), 0))
        .chain(
            named
                .iter()
                .map(|(n, _)| n.as_str())
                .zip(experts.iter().chain(&shared).copied()),
        )
        .collect();
    let mut types = Vec::new();
    let mut configs = Vec::new();
    for &(what, m) in &who {
        let cfg = set.models[m].config().ok_or_else(|| {
            config.error(format!(
                "{what} has no config.json; an MoE is built from Hugging Face decoder folders"
            ))
        })?;
        let t = cfg
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| config.error(format!("{what}: config.json has no model_type")))?;
        types.push(t.to_string());
        configs.push(cfg);
    }
    // Every output architecture takes inputs of one architecture (mergekit's `all same` check);
    // name the first model that differs.
    if let Some(i) = (1..types.len()).find(|&i| types[i] != types[0]) {
        return Err(config.error(format!(
            "{} is a {} model, the base a {} model; every expert must have the base's architecture",
            who[i].0, types[i], types[0]
        )));
    }
    let arch = layout::select(&config, &types)?;
    let field = |cfg: &Value, what: &str, key: &str| -> Result<usize> {
        cfg.get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| config.error(format!("{what}: config.json has no {key}")))
    };
    let base_cfg = &configs[0];
    let layers = field(base_cfg, &base_name, "num_hidden_layers")?;
    let hidden = field(base_cfg, &base_name, "hidden_size")?;
    let intermediate = field(base_cfg, &base_name, "intermediate_size")?;
    for (&(what, _), cfg) in who.iter().zip(&configs).skip(1) {
        for (key, want) in [
            ("num_hidden_layers", layers),
            ("hidden_size", hidden),
            ("intermediate_size", intermediate),
        ] {
            let got = field(cfg, what, key)?;
            if got != want {
                return Err(config.error(format!(
                    "{what} has {key} {got}, the base {want}; every expert must have the base's shape"
                )));
            }
        }
    }
    let dtype = out_dtype(&config, base_cfg)?;
    let mut warnings = Vec::new();
    let n = config.experts.len();
    if !n.is_power_of_two() {
        warnings.push(format!(
            "the model has {n} experts, which is not a power of two; llama.cpp cannot load it"
        ));
    }
    let planner = Planner {
        config: &config,
        set: &set,
        arch,
        layout: opts.layout,
        dtype,
        layers,
        hidden,
        intermediate,
    };
    let mut tensors = planner.base_tensors(base_cfg)?;
    let gated = config.gated().len();
    for l in 0..layers {
        planner.layer(l, &experts, &shared, gated, &mut tensors, &who)?;
    }
    let facts = layout::ConfigFacts {
        experts: n,
        per_token: config.experts_per_token,
        intermediate,
        layers,
        dtype,
    };
    let out_config = layout::out_config(base_cfg, arch, opts.layout, &facts);
    Ok(Prepared {
        config,
        set,
        arch,
        layout: opts.layout,
        layers,
        hidden,
        intermediate,
        tensors,
        out_config,
        warnings,
    })
}

/// `out_dtype`, else `dtype`, else the base config's dtype (mergekit's `select_dtype`); `None`
/// keeps each tensor's own.
fn out_dtype(config: &MoeConfig, base: &Value) -> Result<Option<DType>> {
    for (key, v) in [("out_dtype", &config.out_dtype), ("dtype", &config.dtype)] {
        if let Some(name) = v {
            return DType::parse_float(name).map(Some).ok_or_else(|| {
                config.error(format!(
                    "{key} '{name}' is not a float dtype (bfloat16, float16, float32, float64)"
                ))
            });
        }
    }
    Ok(["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| base.get(*k).and_then(Value::as_str))
        .and_then(DType::parse_float))
}

struct Planner<'a> {
    config: &'a MoeConfig,
    set: &'a ModelSet,
    arch: OutArch,
    layout: Layout,
    dtype: Option<DType>,
    layers: usize,
    hidden: usize,
    intermediate: usize,
}

impl Planner<'_> {
    /// The dtype of an output tensor read from `entry_dtype`.
    fn dtype(&self, from: DType) -> DType {
        self.dtype.unwrap_or(from)
    }

    /// Everything but the MLPs, from the base; Qwen2-MoE's missing q/k/v biases as zeros.
    fn base_tensors(&self, base_cfg: &Value) -> Result<Vec<OutTensor>> {
        let base = &self.set.models[0];
        let mut out = Vec::new();
        for entry in base.tensors() {
            let name = &entry.name;
            if name.contains(".mlp.") || name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            if !layout::carries(self.arch, name) {
                let hint = if name.ends_with("_proj.bias") {
                    "; Qwen2-MoE (`architecture: qwen`, with one shared expert) keeps q/k/v biases"
                } else {
                    ""
                };
                return Err(self.config.error(format!(
                    "base_model {}: tensor {name} has no place in a {} model; dropping it would change what the model computes{hint}",
                    base.path.display(),
                    self.arch.name()
                )));
            }
            if !entry.dtype.is_float() {
                return Err(Error::DTypeMismatch {
                    path: base.path.clone(),
                    name: name.clone(),
                    expected: "a float dtype".into(),
                    found: entry.dtype,
                });
            }
            out.push(self.copy(name, entry.shape.clone(), entry.dtype, 0));
        }
        let embed = "model.embed_tokens.weight";
        let embed_dtype = base
            .entry(embed)
            .map_err(|_| {
                self.config.error(format!(
                    "base_model {}: tensor {embed} not found; the base must be a Llama-style decoder saved with the `model.` prefix",
                    base.path.display()
                ))
            })?
            .dtype;
        let tied = base_cfg
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !base.contains("lm_head.weight") && !tied {
            return Err(self.config.error(format!(
                "base_model {}: no lm_head.weight and config.json does not tie it to the embeddings (tie_word_embeddings); the base is incomplete",
                base.path.display()
            )));
        }
        for l in 0..self.layers {
            for key in [
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
            ] {
                let name = format!("model.layers.{l}.{key}");
                if !base.contains(&name) {
                    return Err(Error::MissingTensor {
                        path: base.path.clone(),
                        name,
                    });
                }
            }
            if self.arch.qkv_bias() {
                for p in ["q", "k", "v"] {
                    let name = format!("model.layers.{l}.self_attn.{p}_proj.bias");
                    if !base.contains(&name) {
                        let weight =
                            base.entry(&format!("model.layers.{l}.self_attn.{p}_proj.weight"))?;
                        out.push(OutTensor {
                            name,
                            shape: vec![weight.shape[0]],
                            dtype: self.dtype(embed_dtype),
                            make: Make::Zeros,
                        });
                    }
                }
            }
            if self.arch.qk_norm() {
                for p in ["q", "k"] {
                    let name = format!("model.layers.{l}.self_attn.{p}_norm.weight");
                    if !base.contains(&name) {
                        return Err(Error::MissingTensor {
                            path: base.path.clone(),
                            name,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// A base tensor copied as it is (converted to the output dtype).
    fn copy(&self, name: &str, shape: Vec<usize>, dtype: DType, model: usize) -> OutTensor {
        let len = shape.iter().product();
        OutTensor {
            name: name.to_string(),
            shape,
            dtype: self.dtype(dtype),
            make: Make::Parts(vec![Part {
                input: Input {
                    rows: None,
                    model,
                    tensor: name.to_string(),
                },
                offset: 0,
                len,
                noise: None,
                scale: None,
                slot: 0,
            }]),
        }
    }

    /// Check expert model `m`'s projection `proj` of layer `l` and return its part.
    fn expert_part(
        &self,
        what: &str,
        m: usize,
        l: usize,
        proj: &str,
        expert: &ExpertConfig,
        slot: usize,
    ) -> Result<(Part, DType)> {
        let input = Input {
            rows: None,
            model: m,
            tensor: format!("model.layers.{l}.mlp.{proj}.weight"),
        };
        let entry = self.set.entry_of(&input).map_err(|_| {
            self.config.error(format!(
                "{what}: tensor {} not found in {}; every expert needs the dense gate_proj, up_proj and down_proj of every layer",
                input.tensor,
                self.set.models[m].path.display()
            ))
        })?;
        let want = if proj == "down_proj" {
            vec![self.hidden, self.intermediate]
        } else {
            vec![self.intermediate, self.hidden]
        };
        if entry.shape != want {
            return Err(Error::ShapeMismatch {
                path: self.set.models[m].path.clone(),
                name: input.tensor.clone(),
                expected: want,
                found: entry.shape.clone(),
            });
        }
        if !entry.dtype.is_float() {
            return Err(Error::DTypeMismatch {
                path: self.set.models[m].path.clone(),
                name: input.tensor.clone(),
                expected: "a float dtype".into(),
                found: entry.dtype,
            });
        }
        let (len, dtype) = (self.hidden * self.intermediate, entry.dtype);
        Ok((
            Part {
                input,
                offset: 0,
                len,
                noise: expert.noise_scale.filter(|&s| s != 0.0),
                scale: expert.residual_scale.filter(|_| proj == "down_proj"),
                slot,
            },
            dtype,
        ))
    }

    /// Layer `l`'s experts and router.
    fn layer(
        &self,
        l: usize,
        experts: &[usize],
        shared: &[usize],
        gated: usize,
        out: &mut Vec<OutTensor>,
        who: &[(&str, usize)],
    ) -> Result<()> {
        let (arch, layout) = (self.arch, self.layout);
        let names = layout::layer_names(arch, layout, l);
        let n = experts.len();
        let mut router_dtype = None;
        // Anything else under an expert's `.mlp.` (biases) has no place in these architectures.
        for (i, &m) in experts.iter().chain(shared).enumerate() {
            let prefix = format!("model.layers.{l}.mlp.");
            let model = &self.set.models[m];
            if let Some(extra) = model.tensors().iter().find(|t| {
                t.name.starts_with(&prefix)
                    && !PROJECTIONS
                        .iter()
                        .any(|p| t.name == format!("{prefix}{p}.weight"))
            }) {
                return Err(self.config.error(format!(
                    "{}: tensor {} has no place in a {} expert (its experts are gate_proj, up_proj and down_proj without biases)",
                    who[i + 1].0,
                    extra.name,
                    arch.name()
                )));
            }
        }
        let cfg_of = |i: usize| -> &ExpertConfig {
            if i < n {
                &self.config.experts[i]
            } else {
                &self.config.shared()[i - n]
            }
        };
        let (h, im) = (self.hidden, self.intermediate);
        match &names.fused {
            Some((gate_up, down)) => {
                let (mut gu, mut dn) = (Vec::new(), Vec::new());
                let mut dtype = None;
                for (e, &m) in experts.iter().enumerate() {
                    let what = who[e + 1].0;
                    for (k, proj) in ["gate_proj", "up_proj"].iter().enumerate() {
                        let (mut p, d) = self.expert_part(what, m, l, proj, cfg_of(e), e)?;
                        p.offset = (2 * e + k) * im * h;
                        dtype.get_or_insert(d);
                        gu.push(p);
                    }
                    let (mut p, _) = self.expert_part(what, m, l, "down_proj", cfg_of(e), e)?;
                    p.offset = e * h * im;
                    dn.push(p);
                }
                let dtype = self.dtype(dtype.expect("at least one expert"));
                router_dtype = Some(dtype);
                out.push(OutTensor {
                    name: gate_up.clone(),
                    shape: vec![n, 2 * im, h],
                    dtype,
                    make: Make::Parts(gu),
                });
                out.push(OutTensor {
                    name: down.clone(),
                    shape: vec![n, h, im],
                    dtype,
                    make: Make::Parts(dn),
                });
            }
            None => {
                let slots = experts
                    .iter()
                    .enumerate()
                    .map(|(e, &m)| (Some(e), e, m))
                    .chain(shared.iter().enumerate().map(|(s, &m)| (None, n + s, m)));
                for (slot, i, m) in slots {
                    for proj in PROJECTIONS {
                        let (p, d) = self.expert_part(who[i + 1].0, m, l, proj, cfg_of(i), i)?;
                        let dtype = self.dtype(d);
                        router_dtype.get_or_insert(dtype);
                        let shape = if proj == "down_proj" {
                            vec![h, im]
                        } else {
                            vec![im, h]
                        };
                        out.push(OutTensor {
                            name: layout::expert_name(arch, layout, l, slot, proj),
                            shape,
                            dtype,
                            make: Make::Parts(vec![p]),
                        });
                    }
                }
            }
        }
        let dtype = router_dtype.expect("at least one expert");
        out.push(OutTensor {
            name: names.router,
            shape: vec![n, h],
            dtype,
            make: Make::Router {
                layer: l,
                experts: 0..n,
            },
        });
        if let Some(name) = names.shared_gate {
            debug_assert_eq!(gated, n + 1, "Qwen2-MoE's shared expert is gated");
            out.push(OutTensor {
                name,
                shape: vec![1, h],
                dtype,
                make: Make::Router {
                    layer: l,
                    experts: n..n + 1,
                },
            });
        }
        Ok(())
    }
}

/// What [`build`] did (what `amalgam moe --json` prints).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The output directory.
    pub output: std::path::PathBuf,
    /// The output architecture's name.
    pub architecture: &'static str,
    /// Its `model_type`.
    pub model_type: &'static str,
    /// `v5` or `legacy`.
    pub layout: String,
    /// Routed experts.
    pub experts: usize,
    /// Shared experts.
    pub shared_experts: usize,
    /// Experts per token.
    pub experts_per_token: usize,
    /// The gate mode.
    pub gate_mode: &'static str,
    /// Prompts encoded (0 for random gates).
    pub prompts: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Output tensors.
    pub tensors: usize,
    /// Layers whose gate matrix is ill-conditioned.
    pub degenerate_layers: Vec<usize>,
    /// Warnings given.
    pub warnings: Vec<String>,
    /// Seconds computing the router weights.
    pub gate_seconds: f64,
    /// Seconds in all.
    pub seconds: f64,
}

/// Build the MoE `prepared` describes into `output`: router weights (random, or from the
/// prompt encoder `encoder` makes for the base when the gate mode needs one), mergekit's
/// warnings through `progress`, then the streamed write.
pub fn build(
    prepared: &Prepared,
    output: &Path,
    opts: &MoeOptions,
    encoder: &mut dyn FnMut(&Prepared) -> Result<Box<dyn PromptEncoder>>,
    progress: &dyn crate::progress::Progress,
) -> Result<Report> {
    let started = std::time::Instant::now();
    prepared.warnings.iter().for_each(|w| progress.warn(w));
    let mode = prepared.config.gate_mode;
    let prompts: usize = prepared
        .config
        .gated()
        .iter()
        .map(|e| e.positive().len() + e.negative().len())
        .sum();
    let (layers, hidden) = (prepared.layers, prepared.hidden);
    let gates = if mode.is_random() {
        gates::compute(&prepared.config, layers, hidden, None, opts.seed)?
    } else {
        let mut enc = encoder(prepared)?;
        gates::compute(
            &prepared.config,
            layers,
            hidden,
            Some(enc.as_mut()),
            opts.seed,
        )?
    };
    let gate_seconds = started.elapsed().as_secs_f64();
    let degenerate = gates::degenerate_layers(&gates);
    let mut warnings = prepared.warnings.clone();
    if let Some(w) = gates::degenerate_warning(&degenerate, layers) {
        progress.warn(&w);
        warnings.push(w);
    }
    let out = write(prepared, &gates, output, opts, progress)?;
    Ok(Report {
        output: out,
        architecture: prepared.arch.name(),
        model_type: prepared.arch.model_type(),
        layout: format!("{:?}", prepared.layout).to_lowercase(),
        experts: prepared.config.experts.len(),
        shared_experts: prepared.config.shared().len(),
        experts_per_token: prepared.config.experts_per_token,
        gate_mode: mode.name(),
        prompts: if mode.is_random() { 0 } else { prompts },
        layers,
        tensors: prepared.tensors.len(),
        degenerate_layers: degenerate,
        warnings,
        gate_seconds,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl Prepared {
    /// The plan as text (`--dry-run`): architecture, then each output tensor and its sources.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "output: {} ({:?} layout), {} experts, {} per token, {} layers, gate_mode {}",
            self.arch.name(),
            self.layout,
            self.config.experts.len(),
            self.config.experts_per_token,
            self.layers,
            self.config.gate_mode.name()
        );
        for (i, r) in self.set.refs.iter().enumerate() {
            let _ = writeln!(s, "model {i}: {}", r.0);
        }
        for t in &self.tensors {
            let from = match &t.make {
                Make::Zeros => "zeros".to_string(),
                Make::Router { layer, experts } => {
                    format!("router layer {layer}, gated experts {experts:?}")
                }
                Make::Parts(parts) => parts
                    .iter()
                    .map(|p| {
                        let mut d = format!("{}:{}", p.input.model, p.input.tensor);
                        if let Some(n) = p.noise {
                            let _ = write!(d, " +noise {n}");
                        }
                        if let Some(k) = p.scale {
                            let _ = write!(d, " x{k}");
                        }
                        d
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let _ = writeln!(s, "{} {:?} {}: {from}", t.name, t.shape, t.dtype);
        }
        s
    }
}
