//! The best objective against trials, as an SVG (no dependencies; opens in any browser).

use std::fmt::Write;

use crate::results::Record;

/// An SVG of every trial's objective (dots) and the best so far (a step line), in trial order.
pub fn svg(records: &[&Record], title: &str) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let mut rs: Vec<&Record> = records.to_vec();
    rs.sort_by_key(|r| r.trial);
    let finite: Vec<f64> = rs
        .iter()
        .map(|r| r.outcome.objective)
        .filter(|v| *v > f64::MIN)
        .collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (lo, hi) = if finite.is_empty() {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    };
    let n = rs.last().map_or(1, |r| r.trial + 1).max(2) as f64;
    let px = |t: f64| left + (w - left - right) * t / (n - 1.0);
    let py = |v: f64| top + (h - top - bottom) * (hi - v.max(lo)) / (hi - lo);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.4}</text>",
            left - 6.0,
            py(v) + 4.0
        );
        let t = ((n - 1.0) * k as f64 / 4.0).round();
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{t}</text>",
            px(t),
            h - bottom + 18.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">trial</text>\
         <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">objective</text>",
        (left + w - right) / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    let mut best = f64::NEG_INFINITY;
    let mut line = String::new();
    for r in &rs {
        let v = r.outcome.objective;
        let (x, y) = (px(r.trial as f64), py(v));
        let _ = writeln!(
            s,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.5\" fill=\"#9ab\"/>"
        );
        if v > best {
            if best > f64::NEG_INFINITY {
                let _ = write!(line, " {x:.1},{:.1}", py(best));
            }
            best = v;
        }
        let _ = write!(line, " {x:.1},{:.1}", py(best));
    }
    let _ = writeln!(
        s,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#c33\" stroke-width=\"2\"/>\n\
         <text x=\"{}\" y=\"{}\" fill=\"#c33\" text-anchor=\"end\">best so far</text>\n</svg>",
        line.trim(),
        w - right,
        top + 14.0
    );
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
