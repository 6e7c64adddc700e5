//! Genotypes and the merge configs they stand for, as mergekit-evolve's `ModelGenome`: a vector
//! of shape [layer groups, models, filters + 1, parameters] (C order), weights starting at 1/N
//! and densities at 1; weights taken in absolute value unless negatives are allowed, densities
//! folded into [0, 1].

use std::path::Path;

use serde_json::{Value, json};

use crate::config::{Genome, Method};
use crate::{Error, Result};

/// The shape of a genome's genotypes.
#[derive(Clone, Debug)]
pub struct Layout {
    genome: Genome,
    /// Layers of the models.
    pub num_layers: usize,
    /// Layer groups (1 when `layer_granularity` is 0).
    pub groups: usize,
    /// Parameter sets per model and group: one per filter, plus the rest.
    pub sets: usize,
}

impl Layout {
    /// The layout of `genome`, reading the layer count from its first model's config.
    pub fn new(genome: &Genome) -> Result<Layout> {
        let first = genome.models[0].split('+').next().unwrap_or_default();
        let model =
            amalgam::io::Model::open(Path::new(first)).map_err(|e| Error::new(e.to_string()))?;
        let num_layers = amalgam::arch::Layout::of(&model).num_layers;
        Layout::with_layers(genome, num_layers)
    }

    /// The layout of `genome` for models of `num_layers` layers.
    pub fn with_layers(genome: &Genome, num_layers: usize) -> Result<Layout> {
        let g = genome.layer_granularity;
        if g > 0 && (num_layers == 0 || !num_layers.is_multiple_of(g)) {
            return Err(Error::new(format!(
                "genome.layer_granularity {g} does not divide the {num_layers} layers of {}",
                genome.models[0]
            )));
        }
        Ok(Layout {
            genome: genome.clone(),
            num_layers,
            groups: num_layers.checked_div(g).unwrap_or(1),
            sets: genome.filters.len() + 1,
        })
    }

    fn params(&self) -> &'static [&'static str] {
        self.genome.merge_method.params()
    }

    /// Values searched.
    pub fn dimension(&self) -> usize {
        self.groups * self.genome.models.len() * self.sets * self.params().len()
    }

    fn index(&self, group: usize, model: usize, set: usize, param: usize) -> usize {
        ((group * self.genome.models.len() + model) * self.sets + set) * self.params().len() + param
    }

    /// mergekit-evolve's initial genotype: weights 1/N, densities 1.
    pub fn initial(&self) -> Vec<f64> {
        let n = self.genome.models.len() as f64;
        let p = self.params().len();
        (0..self.dimension())
            .map(|i| if i % p == 0 { 1.0 / n } else { 1.0 })
            .collect()
    }

    /// The value of parameter `param` as the merge sees it (absolute weights unless negatives
    /// are allowed; densities in [0, 1]).
    fn value(&self, x: &[f64], group: usize, model: usize, set: usize, param: usize) -> f64 {
        let v = x[self.index(group, model, set, param)];
        match self.params()[param] {
            "density" => v.abs().clamp(0.0, 1.0),
            _ if !self.genome.allow_negative_weights => v.abs(),
            _ => v,
        }
    }

    /// One parameter of one model: a number, a gradient over groups (`smooth`), or a list of
    /// `{filter, value}` with the unfiltered value last.
    fn setting(&self, x: &[f64], groups: &[usize], model: usize, param: usize) -> Value {
        let at = |set: usize| -> Value {
            let vs: Vec<f64> = groups
                .iter()
                .map(|&g| self.value(x, g, model, set, param))
                .collect();
            match vs.as_slice() {
                [one] => json!(one),
                _ => json!(vs),
            }
        };
        if self.sets == 1 {
            return at(0);
        }
        let filters = &self.genome.filters;
        Value::Array(
            (0..self.sets)
                .map(|s| match filters.get(s) {
                    Some(f) => json!({"filter": f, "value": at(s)}),
                    None => json!({"value": at(s)}),
                })
                .collect(),
        )
    }

    fn parameters(&self, x: &[f64], groups: &[usize], model: usize) -> Value {
        let mut p = serde_json::Map::new();
        for (k, name) in self.params().iter().enumerate() {
            p.insert((*name).into(), self.setting(x, groups, model, k));
        }
        Value::Object(p)
    }

    /// The merge config genotype `x` stands for (a `models:` merge for one layer group or a
    /// smooth genome, `slices:` otherwise, as mergekit-evolve writes them).
    pub fn merge_config(&self, x: &[f64]) -> Value {
        assert_eq!(x.len(), self.dimension(), "genotype length");
        let g = &self.genome;
        // The base joins the inputs as mergekit-evolve adds it, except for linear, which has no
        // base (it would be one more input, without a weight).
        let base_extra = g
            .base_model
            .as_ref()
            .filter(|b| !g.models.contains(b) && g.merge_method != Method::Linear);
        let step = self.num_layers / self.groups;
        let mut cfg = serde_json::Map::new();
        cfg.insert("merge_method".into(), json!(g.merge_method.name()));
        if let Some(b) = g
            .base_model
            .as_ref()
            .filter(|_| g.merge_method != Method::Linear)
        {
            cfg.insert("base_model".into(), json!(b));
        }
        if g.merge_method == Method::Slerp {
            cfg.insert(
                "slices".into(),
                Value::Array(
                    (0..self.groups)
                        .map(|s| self.slerp_slice(x, s, step))
                        .collect(),
                ),
            );
        } else if self.groups == 1 || g.smooth {
            let groups: Vec<usize> = (0..self.groups).collect();
            let mut models: Vec<Value> = (0..g.models.len())
                .map(
                    |m| json!({"model": g.models[m], "parameters": self.parameters(x, &groups, m)}),
                )
                .collect();
            if let Some(b) = base_extra {
                models.push(json!({"model": b}));
            }
            cfg.insert("models".into(), Value::Array(models));
        } else {
            let slices = (0..self.groups)
                .map(|s| {
                    let range = json!([s * step, (s + 1) * step]);
                    let mut sources: Vec<Value> = (0..g.models.len())
                        .map(|m| {
                            json!({"model": g.models[m], "layer_range": range,
                                   "parameters": self.parameters(x, &[s], m)})
                        })
                        .collect();
                    if let Some(b) = base_extra {
                        sources.push(json!({"model": b, "layer_range": range}));
                    }
                    json!({"sources": sources})
                })
                .collect();
            cfg.insert("slices".into(), Value::Array(slices));
        }
        if g.merge_method != Method::Slerp {
            let normalize = g.normalize.unwrap_or(matches!(
                g.merge_method,
                Method::Linear | Method::Ties | Method::DareTies
            ));
            cfg.insert("parameters".into(), json!({"normalize": normalize}));
        }
        for (key, v) in [
            ("dtype", &g.dtype),
            ("out_dtype", &g.out_dtype),
            ("tokenizer_source", &g.tokenizer_source),
        ] {
            if let Some(v) = v {
                cfg.insert(key.into(), json!(v));
            }
        }
        Value::Object(cfg)
    }

    /// mergekit-evolve's slerp slice: the two models of largest (raw) weight in the group, the
    /// heavier one the slice's base, `t` the lighter one's softmax share.
    fn slerp_slice(&self, x: &[f64], s: usize, step: usize) -> Value {
        let g = &self.genome;
        let w: Vec<f64> = (0..g.models.len())
            .map(|m| x[self.index(s, m, 0, 0)])
            .collect();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&a, &b| {
            w[b].partial_cmp(&w[a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        let (hi, lo) = (order[0], order[1]);
        let t = 1.0 / (1.0 + (w[hi] - w[lo]).exp());
        let range = json!([s * step, (s + 1) * step]);
        let mut sources = vec![
            json!({"model": g.models[hi], "layer_range": range}),
            json!({"model": g.models[lo], "layer_range": range}),
        ];
        if g.tokenizer_source.is_some() {
            sources[0]["parameters"] = json!({"weight": 1.0 - t});
            sources[1]["parameters"] = json!({"weight": t});
        }
        if let Some(b) = g.base_model.as_ref().filter(|b| !g.models.contains(b)) {
            sources.push(json!({"model": b, "layer_range": range}));
        }
        json!({"sources": sources, "base_model": g.models[hi], "parameters": {"t": t}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn genome(yaml: &str) -> Genome {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn one_group_is_a_models_merge_with_mergekit_evolves_start() {
        let g = genome("models: [a, b]\nmerge_method: ties\nbase_model: base\n");
        let l = Layout::with_layers(&g, 4).unwrap();
        assert_eq!(l.dimension(), 4);
        let x = l.initial();
        assert_eq!(x, [0.5, 1.0, 0.5, 1.0]);
        let c = l.merge_config(&[-0.25, 1.5, 0.75, -0.5]);
        assert_eq!(
            c,
            json!({"merge_method": "ties", "base_model": "base", "models": [
                {"model": "a", "parameters": {"weight": 0.25, "density": 1.0}},
                {"model": "b", "parameters": {"weight": 0.75, "density": 0.5}},
                {"model": "base"}], "parameters": {"normalize": true}})
        );
    }

    #[test]
    fn layer_groups_and_filters_are_slices_with_filter_lists() {
        let g = genome(
            "models: [a]\nmerge_method: task_arithmetic\nbase_model: base\nlayer_granularity: 2\n\
             filters: [mlp]\nallow_negative_weights: true\n",
        );
        let l = Layout::with_layers(&g, 4).unwrap();
        assert_eq!(l.dimension(), 4); // 2 groups × 1 model × 2 sets × 1 param
        let c = l.merge_config(&[0.1, -0.2, 0.3, 0.4]);
        assert_eq!(
            c["slices"][1],
            json!({"sources": [
                {"model": "a", "layer_range": [2, 4], "parameters": {"weight": [
                    {"filter": "mlp", "value": 0.3}, {"value": 0.4}]}},
                {"model": "base", "layer_range": [2, 4]}]})
        );
        assert_eq!(c["parameters"], json!({"normalize": false}));
        assert_eq!(
            c["slices"][0]["sources"][0]["parameters"]["weight"][1]["value"],
            json!(-0.2)
        );
    }

    #[test]
    fn smooth_genomes_are_gradients() {
        let g =
            genome("models: [a, b]\nmerge_method: linear\nlayer_granularity: 2\nsmooth: true\n");
        let l = Layout::with_layers(&g, 6).unwrap();
        let c = l.merge_config(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            c["models"][0],
            json!({"model": "a", "parameters": {"weight": [1.0, 3.0, 5.0]}})
        );
    }

    #[test]
    fn slerp_takes_the_two_heaviest_models() {
        let g = genome("models: [a, b, c]\nmerge_method: slerp\n");
        let l = Layout::with_layers(&g, 2).unwrap();
        let c = l.merge_config(&[0.1, 0.9, 0.5]);
        let s = &c["slices"][0];
        assert_eq!(s["base_model"], json!("b"));
        assert_eq!(s["sources"][1]["model"], json!("c"));
        let t = s["parameters"]["t"].as_f64().unwrap();
        assert!((t - 1.0 / (1.0 + 0.4f64.exp())).abs() < 1e-15);
    }

    #[test]
    fn a_granularity_that_does_not_divide_the_layers_is_refused() {
        let g = genome("models: [a]\nmerge_method: linear\nlayer_granularity: 3\n");
        let e = Layout::with_layers(&g, 4).unwrap_err().to_string();
        assert!(e.contains("does not divide the 4 layers of a"), "{e}");
    }
}
