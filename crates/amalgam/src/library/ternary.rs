//! `ternary`: sparse ternary task vectors (T-Switch, Qi et al. 2025; ComPEFT's ternary form).
//!
//! For each matrix (2-D tensor) and task: keep the `density` largest entries of `τ` by
//! magnitude, per sign (`select: sign`, the default, as T-Switch: the top `density` of the
//! positive entries and, separately, of the negative ones) or over all entries
//! (`select: joint`); exactly that many, ties by lower index. Stored: the mask of kept entries
//! (part `mask`, 1 bit per element), the signs of the kept entries in index order (part
//! `sign`, 1 bit per kept entry, `1` = positive) and one norm-preserving scale
//! `α = ‖τ_kept‖₂ / √count` (part `scale`). Other tensors are stored as they are (`raw`).
//! Rebuild: `θ0 + α · mask ⊙ sign`.

use super::bits::{self, BitWriter};
use super::scheme::{self, Decoder, Encoded, Parts, Scheme, TaskStats, TensorInputs};
use crate::config::{Kind, Value};
use crate::error::Result;
use crate::methods::select::{self, Selection, Selector, Want};
use crate::methods::{MergeJob, Method, MethodSpec, ParamSpec, Scope};

/// The ternary scheme.
pub struct Ternary {
    spec: MethodSpec,
}

impl Default for Ternary {
    fn default() -> Self {
        Ternary {
            spec: scheme::spec(
                "ternary",
                "sparse ternary task vectors (T-Switch)",
                "https://arxiv.org/abs/2412.00054",
                vec![
                    ParamSpec::new("density", Kind::Float, Scope::NonBase, Value::Float(0.1)),
                    scheme::choice("select", &["sign", "joint"]),
                ],
            ),
        }
    }
}

/// One selection in the making: its selector until both histogram passes are done.
enum Pick {
    Counting(Box<Selector>),
    Done(Selection),
}

impl Pick {
    fn new(n: usize, want: Want) -> Pick {
        match Selector::new(n, want) {
            Ok(s) => Pick::Counting(Box::new(s)),
            Err(done) => Pick::Done(done),
        }
    }
}

/// The sort key of `τ` for a selection over one sign (`Some(true)`: positives, `Some(false)`:
/// negatives, `None`: all); entries of the other sign get key 0 and are never among the top
/// `density` of their own sign's count.
#[inline]
fn key(tau: f32, side: Option<bool>) -> u32 {
    match side {
        Some(true) if tau <= 0.0 => 0,
        Some(false) if tau >= 0.0 => 0,
        _ => select::key(tau),
    }
}

impl Method for Ternary {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Ternary {
    fn check(&self, job: &MergeJob) -> std::result::Result<(), String> {
        for &i in &job.non_base() {
            scheme::in_range(job, &job.per_input[i], "density", 0.0, 1.0)?;
        }
        Ok(())
    }

    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()> {
        let tasks = job.non_base();
        if scheme::raw_unless_matrix(job, inputs, out)? {
            return Ok(());
        }
        let n = job.numel();
        let sides: Vec<Option<bool>> = if job.shared.choice("select") == "joint" {
            vec![None]
        } else {
            vec![Some(true), Some(false)]
        };
        let density: Vec<f64> = tasks
            .iter()
            .map(|&i| job.per_input[i].f("density"))
            .collect();
        // Joint selections know their count now; per-sign ones after the first pass counts the
        // entries of each sign (retargeted then).
        let mut picks: Vec<Vec<Pick>> = density
            .iter()
            .map(|&d| {
                sides
                    .iter()
                    .map(|side| match side {
                        None => Pick::new(n, Want::TopK((d * n as f64).round() as usize)),
                        Some(_) => Pick::new(n, Want::TopK(n.max(1) - 1)),
                    })
                    .collect()
            })
            .collect();
        let mut counts = vec![vec![0usize; sides.len()]; tasks.len()];
        let mut keys: Vec<u32> = Vec::new();
        inputs.plan_passes(3);
        for pass in 0..2 {
            inputs.pass(1, &mut |chunk, _| {
                let base = chunk.base_tensor();
                for (t, &i) in tasks.iter().enumerate() {
                    for (s, side) in sides.iter().enumerate() {
                        let Pick::Counting(sel) = &mut picks[t][s] else {
                            continue;
                        };
                        keys.clear();
                        keys.extend(
                            chunk.inputs[i]
                                .iter()
                                .zip(base)
                                .map(|(&x, &b)| key(x - b, *side)),
                        );
                        if pass == 0 {
                            if side.is_some() {
                                counts[t][s] += keys.iter().filter(|&&k| k != 0).count();
                            }
                            sel.count_high(&keys);
                        } else {
                            sel.count_low(&keys);
                        }
                    }
                }
                Ok(())
            })?;
            for (t, row) in picks.iter_mut().enumerate() {
                for (s, pick) in row.iter_mut().enumerate() {
                    let Pick::Counting(sel) = pick else { continue };
                    if pass == 0 {
                        if sides[s].is_some() {
                            let k = (density[t] * counts[t][s] as f64).round() as usize;
                            if let Some(done) = sel.retarget(Want::TopK(k)) {
                                *pick = Pick::Done(done);
                                continue;
                            }
                        }
                        sel.end_high();
                    } else {
                        let Pick::Counting(sel) =
                            std::mem::replace(pick, Pick::Done(Selection::nothing()))
                        else {
                            unreachable!("counting")
                        };
                        *pick = Pick::Done(sel.finish());
                    }
                }
            }
        }
        let mut selections: Vec<Vec<Selection>> = picks
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|p| match p {
                        Pick::Done(s) => s,
                        Pick::Counting(_) => unreachable!("both passes ran"),
                    })
                    .collect()
            })
            .collect();
        let mut masks: Vec<BitWriter> = tasks.iter().map(|_| BitWriter::with_capacity(n)).collect();
        let mut signs: Vec<BitWriter> = tasks.iter().map(|_| BitWriter::default()).collect();
        // Per task: Σ τ_kept², Σ |τ_kept|, Σ τ², running in index order (the same whatever the
        // chunking; this loop is bound by the selections' per-element tie counting anyway).
        let mut sums = vec![[0.0f64; 3]; tasks.len()];
        inputs.pass(1, &mut |chunk, _| {
            let base = chunk.base_tensor();
            for (t, &i) in tasks.iter().enumerate() {
                for (&x, &b) in chunk.inputs[i].iter().zip(base) {
                    let tau = x - b;
                    let mut kept = false;
                    for (s, side) in sides.iter().enumerate() {
                        // Every selection sees every element, in order (its tie count).
                        let k = key(tau, *side);
                        kept |= selections[t][s].keep(k) && k != 0;
                    }
                    masks[t].push(kept);
                    let v = tau as f64;
                    if kept {
                        signs[t].push(tau > 0.0);
                        sums[t][0] += v * v;
                        sums[t][1] += v.abs();
                    }
                    sums[t][2] += v * v;
                }
            }
            Ok(())
        })?;
        for (t, (mask, sign)) in masks.into_iter().zip(signs).enumerate() {
            let totals = sums[t];
            let count = sign.len() as f64;
            let alpha = if count > 0.0 {
                (totals[0].sqrt() / count.sqrt()) as f32
            } else {
                0.0
            };
            let a = alpha as f64;
            *out.stats(t) = TaskStats {
                a: a * a * count,
                b: a * totals[1],
                c: totals[2],
                sums: Vec::new(),
            };
            scheme::put_bits(out, t, "mask", mask)?;
            scheme::put_bits(out, t, "sign", sign)?;
            scheme::put_f32(out, t, "scale", &[alpha])?;
        }
        Ok(())
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        if let Some(raw) = scheme::raw_decoder(parts, shape)? {
            return Ok(raw);
        }
        let Some(mask) = parts.task("mask")? else {
            return Ok(Box::new(scheme::Unchanged));
        };
        let n: usize = shape.iter().product();
        scheme::check_len(parts, "mask", mask, n.div_ceil(8))?;
        let kept = bits::count_ones(mask, n);
        let sign = parts
            .task("sign")?
            .ok_or_else(|| parts.corrupt("its part 'sign' is missing".into()))?;
        scheme::check_len(parts, "sign", sign, kept.div_ceil(8))?;
        let scale = scheme::task_f32s(parts, "scale")?;
        let &[alpha] = scale.as_slice() else {
            return Err(parts.corrupt(format!("{} scales; expected 1", scale.len())));
        };
        Ok(Box::new(TernaryDecoder {
            mask,
            sign,
            alpha,
            at: 0,
            kept_before: 0,
        }))
    }
}

struct TernaryDecoder<'a> {
    mask: &'a [u8],
    sign: &'a [u8],
    alpha: f32,
    /// Where the last chunk ended, and how many kept entries precede it (chunks usually come in
    /// order, so the sign index carries on without recounting the mask).
    at: usize,
    kept_before: usize,
}

impl Decoder for TernaryDecoder<'_> {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        if range.start != self.at {
            self.kept_before = bits::count_ones(self.mask, range.start);
        }
        let mut s = self.kept_before;
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            *o = if bits::bit(self.mask, range.start + j) {
                let v = if bits::bit(self.sign, s) {
                    self.alpha
                } else {
                    -self.alpha
                };
                s += 1;
                b + v
            } else {
                b
            };
        }
        self.at = range.end;
        self.kept_before = s;
        Ok(())
    }
}
