//! The valid range of the parameters whose values outside it have no meaning (mergekit takes
//! most of them silently: a density of 1.5 keeps everything, a negative one nothing): checked
//! when the plan resolves them, so a typo is an error naming the model, the parameter and the
//! range before anything is read. Weights and lambdas are unbounded (negative weights subtract
//! a task), as are nearswap's threshold `t` and the research methods' scale factors.

use crate::config::Value;

/// A closed or half-open interval.
struct Range {
    lo: f64,
    hi: f64,
    lo_open: bool,
    text: &'static str,
}

const UNIT: Range = Range {
    lo: 0.0,
    hi: 1.0,
    lo_open: false,
    text: "[0, 1]",
};
const UNIT_OPEN_LOW: Range = Range {
    lo: 0.0,
    hi: 1.0,
    lo_open: true,
    text: "(0, 1]",
};
const NON_NEGATIVE: Range = Range {
    lo: 0.0,
    hi: f64::INFINITY,
    lo_open: false,
    text: "≥ 0",
};
const POSITIVE: Range = Range {
    lo: 0.0,
    hi: f64::INFINITY,
    lo_open: true,
    text: "> 0",
};
const AT_LEAST_ONE: Range = Range {
    lo: 1.0,
    hi: f64::INFINITY,
    lo_open: false,
    text: "≥ 1",
};

/// The range of `param` of `method`, if it has one.
fn range(method: &str, param: &str) -> Option<(Range, &'static str)> {
    Some(match (method, param) {
        (_, "density") => (UNIT, "the fraction of each task vector kept"),
        (_, "gamma") => (UNIT, "the fraction of largest changes dropped"),
        ("della" | "della_linear", "epsilon") => (NON_NEGATIVE, "the spread of keep probabilities"),
        ("ram" | "ramplus_tl", "epsilon") => (
            NON_NEGATIVE,
            "the threshold below which a change counts as none",
        ),
        ("slerp", "t") => (
            UNIT,
            "the position between the base (0) and the other model (1)",
        ),
        ("sce", "select_topk") => (
            UNIT_OPEN_LOW,
            "the fraction of highest-variance elements kept",
        ),
        (_, "common_space_fraction") => (
            UNIT,
            "the fraction of the rank given to the common subspace",
        ),
        (_, "pcb_ratio" | "clamp_ratio") => (UNIT, "a fraction of the elements"),
        (_, "tall_mask_lambda") => (NON_NEGATIVE, "the TALL mask threshold"),
        ("karcher", "max_iter") => (AT_LEAST_ONE, "the iteration count"),
        ("karcher", "tol") => (POSITIVE, "the convergence tolerance"),
        ("multislerp", "eps") => (NON_NEGATIVE, "the tolerance for near-zero norms"),
        ("consensus", "k") => (
            NON_NEGATIVE,
            "the number of tasks that must select a weight",
        ),
        _ => return None,
    })
}

/// Check resolved parameters of `method`: each against its range, and della's `density ±
/// epsilon` within (0, 1) when 0 < density < 1 (mergekit's own condition). Returns what is
/// wrong.
pub fn check(method: &str, params: &[(&'static str, Value)]) -> Result<(), String> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| match v {
                Value::Float(x) => Some(*x),
                Value::Int(i) => Some(*i as f64),
                _ => None,
            })
    };
    for (name, _) in params {
        let (Some((r, what)), Some(x)) = (range(method, name), get(name)) else {
            continue;
        };
        let low_ok = if r.lo_open { x > r.lo } else { x >= r.lo };
        if !(low_ok && x <= r.hi) {
            return Err(format!(
                "parameter '{name}' = {x} is outside {} ({what} for {method})",
                r.text
            ));
        }
    }
    if method.starts_with("della")
        && let (Some(d), Some(e)) = (get("density"), get("epsilon"))
        && d > 0.0
        && d < 1.0
        && (d + e >= 1.0 || d - e <= 0.0)
    {
        return Err(format!(
            "density ± epsilon must lie in (0, 1) for {method}: density {d}, epsilon {e}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_parameter_and_the_interval() {
        let p = |d: f64| vec![("density", Value::Float(d)), ("weight", Value::Float(-2.0))];
        assert!(check("ties", &p(0.0)).is_ok() && check("ties", &p(1.0)).is_ok());
        let e = check("ties", &p(1.5)).unwrap_err();
        assert!(e.contains("'density' = 1.5 is outside [0, 1]"), "{e}");
        assert!(check("ties", &p(-0.1)).is_err());
        assert!(check("sce", &[("select_topk", Value::Float(0.0))]).is_err());
        assert!(check("slerp", &[("t", Value::Float(1.2))]).is_err());
        assert!(check("nearswap", &[("t", Value::Float(1.2))]).is_ok());
        let della = [
            ("density", Value::Float(0.9)),
            ("epsilon", Value::Float(0.15)),
        ];
        assert!(
            check("della", &della)
                .unwrap_err()
                .contains("density ± epsilon")
        );
        let della = [
            ("density", Value::Float(1.0)),
            ("epsilon", Value::Float(0.15)),
        ];
        assert!(check("della", &della).is_ok(), "density 1 keeps everything");
    }
}
