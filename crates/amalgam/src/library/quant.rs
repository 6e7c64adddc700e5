//! `quant`: uniformly quantized task vectors (TVQ, Kim et al. 2025), and their residual form
//! (RTVQ: a shared quantized mean plus quantized per-task offsets).
//!
//! For each matrix (2-D tensor), per group of `group_size` consecutive elements (0, the
//! default: the whole tensor): `lo = min`, `step = (max − min)/(2^bits − 1)`, codes
//! `q = round((x − lo)/step)` of `bits` ∈ {2, 3, 4, 8} bits (part `q`, packed as documented in
//! [`super::bits`]), `lo` and `step` per group (parts `lo`, `step`, f32); `x̂ = lo + q·step`.
//! Without `residual`, `x = τ_t`. With `residual: true`, the mean `μ = (1/T) Σ_t τ_t` is
//! quantized once at `base_bits` (default 3) into shared parts `q`, `lo`, `step`, and each task
//! stores `τ_t − μ̂` at `bits`; rebuild `θ0 + μ̂ + offset̂_t`. Other tensors are stored as they
//! are (`raw`).

use super::bits::{self, BitWriter};
use super::scheme::{self, ChunkStats, Decoder, Encoded, PartSpec, Parts, Scheme, TensorInputs};
use crate::config::{Kind, Value};
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::{MergeJob, Method, MethodSpec, ParamSpec, Scope};

/// The quantization scheme.
pub struct Quant {
    spec: MethodSpec,
}

impl Default for Quant {
    fn default() -> Self {
        Quant {
            spec: scheme::spec(
                "quant",
                "uniformly quantized task vectors (TVQ / RTVQ)",
                "https://arxiv.org/abs/2503.06921",
                vec![
                    ParamSpec::new("bits", Kind::Int, Scope::Shared, Value::Int(4)),
                    ParamSpec::new("group_size", Kind::Int, Scope::Shared, Value::Int(0)),
                    ParamSpec::new("residual", Kind::Bool, Scope::Shared, Value::Bool(false)),
                    ParamSpec::new("base_bits", Kind::Int, Scope::Shared, Value::Int(3)),
                ],
            ),
        }
    }
}

/// Groups of a tensor of `n` elements.
fn groups(n: usize, group: usize) -> usize {
    if group == 0 {
        1
    } else {
        n.div_ceil(group).max(1)
    }
}

/// Per-group minimum and maximum, gathered chunk by chunk.
#[derive(Clone)]
struct Range {
    lo: Vec<f32>,
    hi: Vec<f32>,
    group: usize,
}

impl Range {
    fn new(n: usize, group: usize) -> Range {
        let g = groups(n, group);
        Range {
            lo: vec![f32::INFINITY; g],
            hi: vec![f32::NEG_INFINITY; g],
            group,
        }
    }

    fn observe(&mut self, offset: usize, x: &[f32]) {
        for (g, seg) in segments(offset, x, self.group) {
            let (lo, hi) = seg.iter().fold((self.lo[g], self.hi[g]), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
            (self.lo[g], self.hi[g]) = (lo, hi);
        }
    }

    /// `(lo, step)` per group for `bits`-bit codes.
    fn grid(&self, bits: u32) -> (Vec<f32>, Vec<f32>) {
        let levels = ((1u32 << bits) - 1) as f32;
        self.lo
            .iter()
            .zip(&self.hi)
            .map(|(&lo, &hi)| {
                if lo.is_finite() && hi > lo {
                    (lo, (hi - lo) / levels)
                } else if lo.is_finite() {
                    (lo, 0.0)
                } else {
                    (0.0, 0.0)
                }
            })
            .unzip()
    }
}

/// The parts of elements `offset..offset + x.len()` in each group: `(group, values)`.
fn segments(offset: usize, x: &[f32], group: usize) -> impl Iterator<Item = (usize, &[f32])> {
    let mut e = offset;
    std::iter::from_fn(move || {
        if e >= offset + x.len() {
            return None;
        }
        let (g, end) = match group {
            0 => (0, offset + x.len()),
            _ => (e / group, ((e / group + 1) * group).min(offset + x.len())),
        };
        let seg = &x[e - offset..end - offset];
        e = end;
        Some((g, seg))
    })
}

/// `x.round()` (half away from zero) for `0 ≤ x < 2²³`, without the library call that `round`
/// is on baseline x86-64: the fractional part of such an `x` is exact. (Larger values are
/// clamped by the caller anyway.)
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x as i32 as f32;
    if x - t >= 0.5 { t + 1.0 } else { t }
}

crate::simd::vectorized! {
    /// Append the codes of `seg` on the grid `lo + q·step`, `q ≤ max`, to `q`.
    fn codes_of(seg: &[f32], lo: f32, step: f32, max: f32, q: &mut Vec<u8>) {
        let start = q.len();
        q.resize(start + seg.len(), 0);
        for (o, &v) in q[start..].iter_mut().zip(seg) {
            // Clamped first, so the conversion is exact (and vectorises through i32).
            *o = round_half_away((v - lo) / step).clamp(0.0, max) as i32 as u8;
        }
    }
}

crate::simd::vectorized! {
    /// Append the values `lo + q·step` of codes `q` to `values`.
    fn values_of(q: &[u8], lo: f32, step: f32, values: &mut Vec<f32>) {
        let start = values.len();
        values.resize(start + q.len(), 0.0);
        for (o, &c) in values[start..].iter_mut().zip(q) {
            *o = lo + c as f32 * step;
        }
    }
}

/// A quantization grid: per group `lo` and `step`, `bits` per code.
struct Grid {
    lo: Vec<f32>,
    step: Vec<f32>,
    group: usize,
    bits: u32,
}

impl Grid {
    #[inline]
    fn group_of(&self, e: usize) -> usize {
        e.checked_div(self.group).unwrap_or(0)
    }

    /// Quantize elements `offset..` given in `x`: their codes to `codes` (if given) and the
    /// values they stand for to `values`.
    fn quantize(
        &self,
        offset: usize,
        x: &[f32],
        mut codes: Option<&mut BitWriter>,
        values: &mut Vec<f32>,
    ) {
        values.clear();
        let max = ((1u32 << self.bits) - 1) as f32;
        let mut q: Vec<u8> = Vec::with_capacity(x.len());
        for (g, seg) in segments(offset, x, self.group) {
            let (lo, step) = (self.lo[g], self.step[g]);
            q.clear();
            if step == 0.0 {
                q.resize(seg.len(), 0);
            } else {
                codes_of(seg, lo, step, max, &mut q);
            }
            if let Some(c) = codes.as_deref_mut() {
                c.push_codes(&q, self.bits);
            }
            values_of(&q, lo, step, values);
        }
    }

    #[inline]
    fn value(&self, e: usize, code: u32) -> f32 {
        let g = self.group_of(e);
        self.lo[g] + code as f32 * self.step[g]
    }
}

fn check_bits(job: &MergeJob, name: &str) -> std::result::Result<u32, String> {
    match job.shared.i(name) {
        b @ (2 | 3 | 4 | 8) => Ok(b as u32),
        b => Err(format!(
            "parameter '{name}' is {b} for tensor '{}'; it must be 2, 3, 4 or 8",
            job.name
        )),
    }
}

/// The `q`, `lo`, `step` and `meta` (`[bits, group_size]`, U32) parts of one quantized vector.
fn parts_of(grid: &Grid, codes: BitWriter) -> [scheme::TaskPart; 4] {
    let len = codes.len();
    let meta = [grid.bits, grid.group as u32];
    [
        ("q", DType::U8, vec![len.div_ceil(8)], codes.into_bytes()),
        (
            "lo",
            DType::F32,
            vec![grid.lo.len()],
            bytemuck::cast_slice(&grid.lo).to_vec(),
        ),
        (
            "step",
            DType::F32,
            vec![grid.step.len()],
            bytemuck::cast_slice(&grid.step).to_vec(),
        ),
        (
            "meta",
            DType::U32,
            vec![2],
            bytemuck::cast_slice(&meta).to_vec(),
        ),
    ]
}

impl Method for Quant {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Quant {
    fn check(&self, job: &MergeJob) -> std::result::Result<(), String> {
        check_bits(job, "bits")?;
        check_bits(job, "base_bits")?;
        if job.shared.i("group_size") < 0 {
            return Err(format!(
                "parameter 'group_size' is {} for tensor '{}'; it must be 0 (whole tensor) or a positive group length",
                job.shared.i("group_size"),
                job.name
            ));
        }
        Ok(())
    }

    fn shared_parts(&self, job: &MergeJob, _out: DType) -> Vec<PartSpec> {
        if !job.shared.b("residual") || scheme::matrix(job.shape).is_none() {
            return Vec::new();
        }
        let n = job.numel();
        let g = groups(n, job.shared.i("group_size") as usize);
        let bits = job.shared.i("base_bits") as u32;
        vec![
            PartSpec {
                suffix: "q",
                dtype: DType::U8,
                shape: vec![bits::packed_len(n, bits)],
            },
            PartSpec {
                suffix: "lo",
                dtype: DType::F32,
                shape: vec![g],
            },
            PartSpec {
                suffix: "step",
                dtype: DType::F32,
                shape: vec![g],
            },
            PartSpec {
                suffix: "meta",
                dtype: DType::U32,
                shape: vec![2],
            },
        ]
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
        let group = job.shared.i("group_size") as usize;
        let bits = job.shared.i("bits") as u32;
        let residual = job.shared.b("residual");
        let t_count = tasks.len() as f32;
        // Per chunk: each task's τ, and their mean.
        let (mut taus, mut mean) = (vec![Vec::new(); tasks.len()], Vec::new());
        let fill = |chunk: &MergeJob, taus: &mut Vec<Vec<f32>>, mean: &mut Vec<f32>| {
            let base = chunk.base_tensor();
            for (tau, &i) in taus.iter_mut().zip(&tasks) {
                scheme::delta_into(chunk.inputs[i], base, tau);
            }
            if residual {
                mean.clear();
                mean.resize(base.len(), 0.0);
                for tau in taus.iter() {
                    mean.iter_mut().zip(tau).for_each(|(m, &t)| *m += t);
                }
                mean.iter_mut().for_each(|m| *m /= t_count);
            }
        };
        inputs.plan_passes(if residual { 3 } else { 2 });
        // The shared mean's grid first (residual only).
        let shared_grid = if residual {
            let mut r = Range::new(n, group);
            inputs.pass(1, &mut |chunk, offset| {
                fill(chunk, &mut taus, &mut mean);
                r.observe(offset, &mean);
                Ok(())
            })?;
            let base_bits = job.shared.i("base_bits") as u32;
            let (lo, step) = r.grid(base_bits);
            Some(Grid {
                lo,
                step,
                group,
                bits: base_bits,
            })
        } else {
            None
        };
        let (mut centre, mut x, mut values) = (Vec::new(), Vec::new(), Vec::new());
        let mut ranges: Vec<Range> = vec![Range::new(n, group); tasks.len()];
        inputs.pass(1, &mut |chunk, offset| {
            fill(chunk, &mut taus, &mut mean);
            if let Some(g) = &shared_grid {
                g.quantize(offset, &mean, None, &mut centre);
            }
            for (r, tau) in ranges.iter_mut().zip(&taus) {
                x.clear();
                match &shared_grid {
                    Some(_) => x.extend(tau.iter().zip(&centre).map(|(t, c)| t - c)),
                    None => x.extend_from_slice(tau),
                }
                r.observe(offset, &x);
            }
            Ok(())
        })?;
        let grids: Vec<Grid> = ranges
            .iter()
            .map(|r| {
                let (lo, step) = r.grid(bits);
                Grid {
                    lo,
                    step,
                    group,
                    bits,
                }
            })
            .collect();
        let mut codes: Vec<BitWriter> = tasks
            .iter()
            .map(|_| BitWriter::with_capacity(n * bits as usize))
            .collect();
        let mut shared_codes = BitWriter::default();
        let mut stats = vec![ChunkStats::new(0); tasks.len()];
        inputs.pass(1, &mut |chunk, offset| {
            fill(chunk, &mut taus, &mut mean);
            if let Some(g) = &shared_grid {
                g.quantize(offset, &mean, Some(&mut shared_codes), &mut centre);
            }
            for (t, tau) in taus.iter().enumerate() {
                x.clear();
                match &shared_grid {
                    Some(_) => x.extend(tau.iter().zip(&centre).map(|(t, c)| t - c)),
                    None => x.extend_from_slice(tau),
                }
                grids[t].quantize(offset, &x, Some(&mut codes[t]), &mut values);
                if shared_grid.is_some() {
                    values.iter_mut().zip(&centre).for_each(|(v, c)| *v += c);
                }
                stats[t].observe(offset, &values, tau);
            }
            Ok(())
        })?;
        if let Some(g) = &shared_grid {
            for (k, (_, _, _, bytes)) in parts_of(g, shared_codes).into_iter().enumerate() {
                out.shared_bytes(k, 0, &bytes)?;
            }
        }
        for (t, (grid, codes)) in grids.iter().zip(codes).enumerate() {
            *out.stats(t) = stats[t].totals();
            for (suffix, dtype, shape, bytes) in parts_of(grid, codes) {
                out.task(t, suffix, dtype, shape, bytes)?;
            }
        }
        Ok(())
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        if let Some(raw) = scheme::raw_decoder(parts, shape)? {
            return Ok(raw);
        }
        let Some(q) = parts.task("q")? else {
            return Ok(Box::new(scheme::Unchanged));
        };
        let n: usize = shape.iter().product();
        let task_part = |s: &str| -> Result<Vec<u8>> {
            Ok(parts
                .task(s)?
                .ok_or_else(|| parts.corrupt(format!("its part '{s}' is missing")))?
                .to_vec())
        };
        let task = grid_of(parts, n, q.len(), &task_part)?;
        let shared = match parts.shared_bytes("q")? {
            Some(sq) => {
                let shared_part = |s: &str| -> Result<Vec<u8>> {
                    parts
                        .shared_bytes(s)?
                        .ok_or_else(|| parts.corrupt(format!("the shared part '{s}' is missing")))
                };
                let g = grid_of(parts, n, sq.len(), &shared_part)?;
                Some((g, sq))
            }
            None => None,
        };
        Ok(Box::new(QuantDecoder { q, task, shared }))
    }
}

/// The grid of a quantized vector of `n` elements whose codes take `len` bytes, from its
/// `lo`, `step` and `meta` parts.
fn grid_of(
    parts: &dyn Parts,
    n: usize,
    len: usize,
    part: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<Grid> {
    let floats = |s: &str| -> Result<Vec<f32>> {
        scheme::le_f32s(&part(s)?)
            .ok_or_else(|| parts.corrupt(format!("its part '{s}' is not F32")))
    };
    let (lo, step) = (floats("lo")?, floats("step")?);
    let meta: Vec<u32> = part("meta")?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let &[bits, group] = meta.as_slice() else {
        return Err(parts.corrupt("its part 'meta' is not [bits, group_size]".into()));
    };
    let group = group as usize;
    if ![2, 3, 4, 8].contains(&bits) || bits::packed_len(n, bits) != len {
        return Err(parts.corrupt(format!(
            "{len} code bytes do not hold {n} codes of {bits} bits"
        )));
    }
    if lo.len() != groups(n, group) || step.len() != lo.len() {
        return Err(parts.corrupt(format!(
            "{} offsets and {} steps for {} groups",
            lo.len(),
            step.len(),
            groups(n, group)
        )));
    }
    Ok(Grid {
        lo,
        step,
        group,
        bits,
    })
}

struct QuantDecoder<'a> {
    q: &'a [u8],
    task: Grid,
    shared: Option<(Grid, Vec<u8>)>,
}

impl Decoder for QuantDecoder<'_> {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            let e = range.start + j;
            let centre = match &self.shared {
                Some((g, q)) => g.value(e, bits::code(q, e, g.bits)),
                None => 0.0,
            };
            *o = b + (centre + self.task.value(e, bits::code(self.q, e, self.task.bits)));
        }
        Ok(())
    }
}
