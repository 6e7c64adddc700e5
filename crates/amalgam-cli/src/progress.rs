//! A terminal progress bar over the library's progress reports: tensors and bytes done, rate,
//! ETA. Drawn only when stderr is a terminal and `--quiet` is not given.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress shown on stderr.
pub struct Bar {
    bar: Option<ProgressBar>,
    quiet: bool,
    what: String,
}

impl Bar {
    /// A bar labelled `what`; hidden when `quiet` or stderr is not a terminal.
    pub fn new(what: &str, quiet: bool) -> Bar {
        let bar = shown(quiet).then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("valid template"),
            );
            b.set_prefix(what.to_string());
            b
        });
        Bar {
            bar,
            quiet,
            what: what.to_string(),
        }
    }
}

/// Whether progress is drawn: stderr is a terminal and `--quiet` was not given.
fn shown(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// A bar counting `total` items (`unit`, e.g. "examples"), labelled `what`; `None` when hidden.
#[cfg(feature = "eval")]
pub fn counter(what: &str, total: u64, unit: &str, quiet: bool) -> Option<ProgressBar> {
    shown(quiet).then(|| {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}"
            ))
            .expect("valid template"),
        );
        b.set_prefix(what.to_string());
        b
    })
}

impl amalgam::progress::Progress for Bar {
    fn start(&self, tensors: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_position(0);
            b.reset_eta();
            b.set_length(bytes);
            b.set_message(format!("{tensors} tensors"));
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn stage(&self, name: &str) {
        if let Some(b) = &self.bar {
            b.set_prefix(if name.is_empty() {
                self.what.clone()
            } else {
                format!("{} ({name})", self.what)
            });
        }
    }
    fn warn(&self, message: &str) {
        self.note(&format!("warning: {message}"));
    }
    fn note(&self, message: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{message}")),
            None => eprintln!("{message}"),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
