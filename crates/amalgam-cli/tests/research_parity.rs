//! Parity of the research merge methods with independent reference implementations
//! (FusionBench 0.2.33; see scripts/gen_research_fixtures.py, which made every expected output
//! under tests/fixtures/research). Norm-relative error per tensor must be at most 1e-4: the SVD
//! methods are compared on the merged weights, so singular-vector signs and rotations within
//! repeated singular values do not matter.

mod common;

use std::path::{Path, PathBuf};

use common::parity_cases;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/research")
}

parity_cases!(
    fixtures(), 1e-4;
    iso_c,
    iso_c_exclude_lm_head,
    iso_cts,
    iso_cts_half,
    tsv_m,
    tsv_m_weights,
    emr,
    emr_lambda,
    ties_global_sum,
    ties_global_mean,
    ties_global_bf16_majority,
    consensus_ta,
    consensus_ties,
    pcb_vision,
    pcb_nlp,
);
