//! `passthrough`: copy the single input, optionally scaled (used to stack layer slices).

use super::*;
use crate::config::Kind;

/// Copy one input.
pub struct Passthrough(MethodSpec);

impl Default for Passthrough {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        Passthrough(MethodSpec {
            name: "passthrough",
            pretty_name: "Passthrough",
            reference: "",
            params: vec![ParamSpec::new(
                "scale",
                Kind::OptionalFloat,
                Scope::Input,
                Value::None,
            )],
            contract: Contract {
                max_inputs: Some(1),
                ..Contract::ANY
            },
        })
    }
}

impl Method for Passthrough {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        Some(self)
    }
}

impl Streaming for Passthrough {
    fn apply(
        &self,
        job: &MergeJob,
        _offset: usize,
        _state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        out.copy_from_slice(job.inputs[0]);
        if let Some(s) = job.per_input[0].opt_f("scale") {
            let s = s as f32;
            out.iter_mut().for_each(|o| *o *= s);
        }
        Ok(())
    }
}
