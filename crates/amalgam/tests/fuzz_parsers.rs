//! Fuzzing on the stable toolchain: every parser of user-supplied files — safetensors header,
//! shard index, merge and library YAML configs, library manifest, PEFT adapter config — fed
//! mutations of the committed corpus (`fuzz/seeds/<target>/`) for a bounded time. Any panic,
//! any input that takes longer than [`SLOW`], or any input during which the parser's live
//! allocations pass [`MEMORY`] fails the test, and the input is saved under
//! `target/fuzz-failures/` to replay. (An allocation too large to satisfy at all aborts the
//! process, which fails the test too, without the saved input.)
//!
//! `cargo test --test fuzz_parsers` runs each target for `AMALGAM_FUZZ_SECONDS` (default 5)
//! seconds; longer runs on demand: `AMALGAM_FUZZ_SECONDS=600 cargo test --release --test
//! fuzz_parsers -- --nocapture` (each target's executions are printed). `AMALGAM_FUZZ_SEED`
//! changes the mutations (default 1: the same inputs every run).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts live bytes and their peak, so that a parser asking for memory out of proportion to
/// its input is caught.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's layout, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's pointer and layout, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most one input may take.
const SLOW: Duration = Duration::from_secs(2);
/// The most a parser may hold live beyond what was live before it ran.
const MEMORY: usize = 256 << 20;

/// One fuzz target: its corpus directory name and the check of one input (which must return,
/// with `Ok` or an error, and assert what an accepted input guarantees).
struct Target {
    name: &'static str,
    run: fn(&[u8]),
}

/// Every parser, with the checks in `amalgam::fuzz` (which the libFuzzer targets run too).
const TARGETS: &[Target] = &[
    Target {
        name: "header",
        run: amalgam::fuzz::header,
    },
    Target {
        name: "index",
        run: amalgam::fuzz::index,
    },
    Target {
        name: "merge_config",
        run: amalgam::fuzz::merge_config,
    },
    Target {
        name: "library_config",
        run: amalgam::fuzz::library_config,
    },
    Target {
        name: "manifest",
        run: amalgam::fuzz::manifest,
    },
    Target {
        name: "adapter_config",
        run: amalgam::fuzz::adapter_config,
    },
];

/// xorshift64*: a seeded stream of mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens worth inserting into the text formats and over numbers in the binary one.
const TOKENS: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1e309",
    b"NaN",
    b"18446744073709551615",
    b"9999999999999999999999",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"true",
    b"- ",
    b"\n  ",
    b"&a",
    b"*a",
    b"!!",
    b"\"F32\"",
    b"\"BF16\"",
    b"\"shape\"",
    b"\"data_offsets\"",
    b"\"__metadata__\"",
    b"../",
    b"/etc/passwd",
    b"\\u0000",
    b"\xff\xfe",
    b"~",
];

/// One mutation of `base` (another corpus input `other` for splices).
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = [0u8, 0xff, 0x7f, 0x80, b'9', b'"', b' '][rng.below(7)];
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let i = rng.below(len + 1);
                d.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(32)).min(len);
                d.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk = d[a..b].to_vec();
                let i = rng.below(len + 1);
                d.splice(i..i, chunk);
            }
            5 => d.truncate(rng.below(len + 1)),
            6 if !other.is_empty() => {
                let a = rng.below(len + 1);
                let b = rng.below(other.len());
                d.truncate(a);
                d.extend_from_slice(&other[b..]);
            }
            7 if len >= 8 => {
                // The safetensors length prefix, or any 8 bytes, set to an extreme.
                let i = if rng.below(2) == 0 {
                    0
                } else {
                    rng.below(len - 7)
                };
                let v = [
                    0u64,
                    1,
                    7,
                    u64::MAX,
                    u64::MAX / 2,
                    len as u64,
                    len as u64 - 7,
                ][rng.below(7)];
                d[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ if len > 0 => {
                // Replace a run of digits with a token.
                let i = rng.below(len);
                if let Some(s) = (i..len).find(|&j| d[j].is_ascii_digit()) {
                    let e = (s..len).find(|&j| !d[j].is_ascii_digit()).unwrap_or(len);
                    d.splice(s..e, TOKENS[rng.below(6)].iter().copied());
                }
            }
            _ => {}
        }
    }
    d
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = repo().join("fuzz/seeds").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!inputs.is_empty(), "{}: empty corpus", dir.display());
    inputs
}

/// Save a failing input; its path.
fn save(name: &str, data: &[u8]) -> PathBuf {
    let dir = repo().join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{name}-{hash:016x}"));
    std::fs::write(&path, data).unwrap();
    path
}

/// Run `target` on one input, checking time and memory; a description of the failure.
fn one(target: &Target, data: &[u8]) -> Option<String> {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| (target.run)(data));
    let took = start.elapsed();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    match result {
        Err(_) => Some("panicked".into()),
        Ok(()) if took > SLOW => Some(format!("took {took:?}")),
        Ok(()) if peak > MEMORY => Some(format!("held {peak} bytes")),
        Ok(()) => None,
    }
}

#[test]
fn parsers_survive_mutated_inputs() {
    let seconds: f64 = std::env::var("AMALGAM_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let seed: u64 = std::env::var("AMALGAM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // The panics are expected to be caught and reported here, not printed one by one.
    std::panic::set_hook(Box::new(|_| {}));
    self_test();
    let mut failures = Vec::new();
    for target in TARGETS {
        let inputs = corpus(target.name);
        // The corpus itself first, then mutations until the time is up.
        let mut runs = 0u64;
        for data in &inputs {
            if let Some(why) = one(target, data) {
                failures.push(format!("{}: corpus input {why}", target.name));
            }
            runs += 1;
        }
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ target.name.len() as u64 | 1);
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < deadline {
            let base = &inputs[rng.below(inputs.len())];
            let other = &inputs[rng.below(inputs.len())];
            let data = mutate(&mut rng, base, other);
            runs += 1;
            if let Some(why) = one(target, &data) {
                let path = save(target.name, &data);
                failures.push(format!("{}: {why} on {}", target.name, path.display()));
                if failures.len() > 20 {
                    break;
                }
            }
        }
        println!("fuzz {}: {runs} executions, seed {seed}", target.name);
    }
    let _ = std::panic::take_hook();
    assert!(
        failures.is_empty(),
        "fuzz failures:\n{}",
        failures.join("\n")
    );
}

/// The harness itself: a panicking target and a memory hog are reported, a quiet one is not.
/// (Run inside the one test, so that no other test's allocations reach the counters.)
fn self_test() {
    let panics = Target {
        name: "self-test",
        run: |d| assert!(d.len() < 3, "too long"),
    };
    let hog = Target {
        name: "self-test",
        run: |_| {
            let v = vec![1u8; MEMORY + (1 << 20)];
            std::hint::black_box(&v);
        },
    };
    let fine = Target {
        name: "self-test",
        run: |_| {},
    };
    assert_eq!(one(&panics, b"abcd").as_deref(), Some("panicked"));
    assert!(one(&hog, b"").is_some_and(|w| w.starts_with("held")));
    assert_eq!(one(&fine, b"abcd"), None);
}
