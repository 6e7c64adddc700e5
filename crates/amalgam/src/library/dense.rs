//! `dense`: every task's changed tensors stored as they are (part `raw`, the fine-tune's own
//! dtype and bytes). Lossless, for comparison: rebuilding gives the fine-tune's bytes exactly
//! when the output dtype is the stored one. Tensors equal to the base are not stored.

use super::scheme::{self, Decoder, Encoded, Parts, Scheme, TaskStats, TensorInputs};
use crate::error::Result;
use crate::methods::{MergeJob, Method, MethodSpec};

/// The lossless scheme.
pub struct Dense {
    spec: MethodSpec,
}

impl Default for Dense {
    fn default() -> Self {
        Dense {
            spec: scheme::spec(
                "dense",
                "lossless (the changed tensors as they are)",
                "",
                vec![],
            ),
        }
    }
}

impl Method for Dense {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Dense {
    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()> {
        let base = inputs.raw(job.base.expect("contract: a base"))?;
        for (t, &i) in job.non_base().iter().enumerate() {
            let (dtype, bytes) = inputs.raw(i)?;
            if (dtype, &bytes) == (base.0, &base.1) {
                continue;
            }
            // Stored exactly: the error is 0 (a = b = c).
            *out.stats(t) = TaskStats {
                a: 1.0,
                b: 1.0,
                c: 1.0,
                sums: Vec::new(),
            };
            out.task(t, "raw", dtype, job.shape.to_vec(), bytes)?;
        }
        Ok(())
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        Ok(scheme::raw_decoder(parts, shape)?.unwrap_or(Box::new(scheme::Unchanged)))
    }
}
