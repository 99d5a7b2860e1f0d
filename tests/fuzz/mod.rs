//! The mutation fuzzer behind the `fuzz_*` tests of every crate (each includes this file with
//! `#[path]`, so the crates stay free of a shared test-only dependency).
//!
//! Every parser's property is the same: on any input, however damaged, it returns a value or an
//! error whose message is one non-empty line; it never panics and never hangs. Inputs are valid
//! files mutated by a seeded generator, so every run tries the same cases and a failure names
//! the case that reproduces it (`MMC_FUZZ_CASE=<target>:<case>` reruns just that case and saves
//! its input). `MMC_FUZZ_CASES=<n>` changes the number of cases of every target, for a longer
//! run than CI's; `MMC_FUZZ_TRACE=1` names each case before it runs, to find the one that
//! aborts the process (an allocation too large to fail gracefully).
#![allow(dead_code)]

use serde_json::{Map, Value as Json};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// A case running longer than this is a hang; generous, as a case takes milliseconds.
pub const CASE_LIMIT: Duration = Duration::from_secs(5);

/// SplitMix64: tiny, seedable, and the same on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What a case was, for the failure report.
pub trait Input {
    /// A short, printable description (kind of mutation, a preview of the bytes).
    fn describe(&self) -> String;
    /// The files that reproduce the case, written under `dir`.
    fn save(&self, dir: &Path);
}

/// One mutated file: its name and bytes, and the mutations that made it.
#[derive(Clone, Debug)]
pub struct FileCase {
    pub name: String,
    pub bytes: Vec<u8>,
    pub how: Vec<String>,
}

impl Input for FileCase {
    fn describe(&self) -> String {
        format!(
            "{} ({} bytes; {}): {}",
            self.name,
            self.bytes.len(),
            self.how.join(", "),
            preview(&self.bytes, 600)
        )
    }

    fn save(&self, dir: &Path) {
        write(&dir.join(&self.name), &self.bytes);
    }
}

/// Several mutated files that are read together (a checkpoint folder, a data.json with its
/// meta file).
#[derive(Clone, Debug)]
pub struct FilesCase(pub Vec<FileCase>);

impl Input for FilesCase {
    fn describe(&self) -> String {
        self.0
            .iter()
            .filter(|f| !f.how.is_empty())
            .map(FileCase::describe)
            .collect::<Vec<_>>()
            .join("\n    ")
    }

    fn save(&self, dir: &Path) {
        for f in &self.0 {
            f.save(dir);
        }
    }
}

/// Writes a case's file. Not `std::fs::write`: truncating first makes each write cost
/// milliseconds on file systems mounted with `discard`, overwriting in place microseconds.
pub fn write(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(bytes)
        .and_then(|()| f.set_len(bytes.len() as u64))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The bytes as escaped text, cut to about `max` characters.
pub fn preview(bytes: &[u8], max: usize) -> String {
    let s: String = bytes
        .iter()
        .take(max)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if bytes.len() > max {
        format!("{s}...")
    } else {
        s
    }
}

/// What a target's run of cases came to.
#[derive(Debug)]
pub struct Summary {
    pub target: String,
    pub cases: usize,
    pub ok: usize,
    pub err: usize,
    pub wall: Duration,
    /// Of `wall`, the time spent in the parser (the rest makes and writes the inputs).
    pub parsing: Duration,
    pub slowest: Duration,
    pub slowest_case: usize,
}

thread_local! {
    /// Set while a case runs on this thread: its panic is recorded, not printed.
    static CAUGHT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let recorded = CAUGHT.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        let msg = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(no message)".into());
                        let at = info
                            .location()
                            .map_or(String::new(), |l| format!(" at {l}"));
                        *slot = Some(format!("{msg}{at}"));
                        if std::env::var_os("MMC_FUZZ_CASE").is_some() {
                            // Rerunning one case: where the panic came from.
                            let trace = std::backtrace::Backtrace::force_capture();
                            let _ = writeln!(std::io::stderr(), "fuzz: panic{at}\n{trace}");
                        }
                        true
                    }
                    None => false,
                }
            });
            if !recorded {
                previous(info);
            }
        }));
    });
}

/// Cases now running, by a key of their own: what they are and since when.
fn running() -> &'static Mutex<HashMap<u64, (String, Instant)>> {
    static RUNNING: OnceLock<Mutex<HashMap<u64, (String, Instant)>>> = OnceLock::new();
    RUNNING.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(100));
            let cases = running().lock().unwrap_or_else(|p| p.into_inner());
            if let Some((label, since)) = cases.values().find(|(_, t)| t.elapsed() > CASE_LIMIT) {
                // A hung case cannot be interrupted from here; end the whole test binary so
                // that CI fails now instead of at its global timeout.
                // Straight to the stream: the test harness would swallow `eprintln!` of a
                // process that exits.
                let _ = writeln!(
                    std::io::stderr(),
                    "\nfuzz: {label} has run for {:.1} s (limit {} s): a hang; rerun it alone with \
                     MMC_FUZZ_CASE={} to save its input",
                    since.elapsed().as_secs_f64(),
                    CASE_LIMIT.as_secs(),
                    label.replace(" case ", ":")
                );
                std::process::exit(101);
            }
        });
        Mutex::new(HashMap::new())
    })
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The number of cases to run: `default`, or `MMC_FUZZ_CASES`.
pub fn case_count(default: usize) -> usize {
    std::env::var("MMC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `cases` cases of `target`: `make` builds case `i`'s input from its own seeded
/// generator, `check` runs the parser on it. `check` returns the parser's error message, if
/// any; `Ok(())` covers success. Fails the test on any panic, hang, empty or multi-line error.
pub fn run<I: Input>(
    target: &str,
    cases: usize,
    mut make: impl FnMut(&mut Rng) -> I,
    mut check: impl FnMut(&I) -> Result<(), String>,
) -> Summary {
    install_panic_hook();
    let only: Option<usize> = std::env::var("MMC_FUZZ_CASE").ok().and_then(|v| {
        let (t, i) = v.rsplit_once(':')?;
        (t == target).then(|| i.parse().ok()).flatten()
    });
    let trace = std::env::var_os("MMC_FUZZ_TRACE").is_some();
    let key = fnv(target) ^ fnv(&format!("{:?}", std::thread::current().id()));
    let start = Instant::now();
    let mut summary = Summary {
        target: target.to_string(),
        cases: 0,
        ok: 0,
        err: 0,
        wall: Duration::ZERO,
        parsing: Duration::ZERO,
        slowest: Duration::ZERO,
        slowest_case: 0,
    };
    // Failures by kind and place, with the first case of each.
    let mut failures: BTreeMap<String, (usize, usize, String)> = BTreeMap::new();
    for i in 0..cases {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let mut rng = Rng::new(fnv(target) ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let input = make(&mut rng);
        if only.is_some() {
            let dir = std::env::temp_dir().join(format!("mmc-fuzz-{target}-{i}"));
            let _ = std::fs::create_dir_all(&dir);
            input.save(&dir);
            eprintln!("fuzz: case {target}:{i} saved in {}", dir.display());
            eprintln!("    {}", input.describe());
        }
        if trace {
            // Straight to the stream, so that it is there when an abort (a failed huge
            // allocation) ends the process.
            let _ = writeln!(std::io::stderr(), "fuzz: running {target}:{i}");
        }
        let t0 = Instant::now();
        running()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (format!("{target} case {i}"), t0));
        CAUGHT.with(|c| *c.borrow_mut() = Some(None));
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
        let panicked = CAUGHT.with(|c| c.borrow_mut().take()).flatten();
        running()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if t0.elapsed() > summary.slowest {
            summary.slowest = t0.elapsed();
            summary.slowest_case = i;
        }
        summary.parsing += t0.elapsed();
        summary.cases += 1;
        let failure = match outcome {
            Err(_) => Some(format!(
                "panic: {}",
                panicked.unwrap_or_else(|| "(unknown)".into())
            )),
            Ok(Ok(())) => {
                summary.ok += 1;
                None
            }
            Ok(Err(msg)) => {
                summary.err += 1;
                if msg.trim().is_empty() {
                    Some("empty error message".to_string())
                } else if msg.contains('\n') || msg.contains('\r') {
                    Some(format!("multi-line error message: {msg:?}"))
                } else {
                    None
                }
            }
        };
        if let Some(f) = failure {
            let kind = failure_kind(&f);
            let e = failures
                .entry(kind)
                .or_insert_with(|| (i, 0, format!("{f}\n    input: {}", input.describe())));
            e.1 += 1;
        }
    }
    summary.wall = start.elapsed();
    eprintln!(
        "fuzz {target}: {} cases ({} ok, {} errors) in {:.2} s ({:.2} s parsing), slowest case {:.1} ms ({target}:{})",
        summary.cases,
        summary.ok,
        summary.err,
        summary.wall.as_secs_f64(),
        summary.parsing.as_secs_f64(),
        summary.slowest.as_secs_f64() * 1e3,
        summary.slowest_case
    );
    if !failures.is_empty() {
        let report: Vec<String> = failures
            .values()
            .map(|(case, n, what)| {
                format!("case {target}:{case} (and {} more like it): {what}", n - 1)
            })
            .collect();
        panic!(
            "fuzz {target}: {} kinds of failure (rerun one with MMC_FUZZ_CASE=<target>:<case>):\n{}",
            report.len(),
            report.join("\n")
        );
    }
    summary
}

/// For a case that makes several messages (one per line of a file, per tensor): the first that
/// is not one clear line, else the first error, else success.
pub fn all_clear(messages: Vec<String>) -> Result<(), String> {
    let unclear = messages
        .iter()
        .find(|m| m.trim().is_empty() || m.contains('\n') || m.contains('\r'));
    match (unclear, messages.first()) {
        (Some(m), _) | (None, Some(m)) => Err(m.clone()),
        (None, None) => Ok(()),
    }
}

/// What failures of one bug have in common: a panic's location, or an error's words without
/// numbers and paths (so that "index 7" and "index 9", or two temporary folders, count once).
fn failure_kind(f: &str) -> String {
    if let Some(at) = f
        .strip_prefix("panic: ")
        .and_then(|m| m.rsplit_once(" at "))
    {
        return format!("panic at {}", at.1);
    }
    f.split_whitespace()
        .filter(|w| !w.contains('/') && !w.contains(|c: char| c.is_ascii_digit()))
        .take(10)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A fresh directory for the cases of one target, removed when dropped. (Not `tempfile`, which
/// not every crate has as a dev-dependency.)
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(target: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "mmc-fuzz-{target}-{}-{:x}",
            std::process::id(),
            fnv(&format!("{:?}", Instant::now()))
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a seed file of the repository (`rel` from the workspace root).
pub fn seed(root: &Path, rel: &str) -> Vec<u8> {
    let p = root.join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("seed {}: {e}", p.display()))
}

/// The workspace root, from a crate's manifest directory.
pub fn workspace(manifest_dir: &str) -> PathBuf {
    let dir = Path::new(manifest_dir);
    if dir.join("Cargo.lock").exists() {
        dir.to_path_buf()
    } else {
        dir.join("..")
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-level mutations: what a cut download, a bad disk or a careless edit does to a file.

/// Values that sit on the edges parsers get wrong: zero, all ones, sign bits, powers of two.
const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x1_0000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 7,
];

/// Applies one byte-level mutation; returns its name.
pub fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    mutate_bytes_in(rng, bytes, 0)
}

/// Like [`mutate_bytes`], but positions of point mutations are drawn from `from..` half of the
/// time from the first 64 bytes after `from` (where headers live).
pub fn mutate_bytes_in(rng: &mut Rng, bytes: &mut Vec<u8>, from: usize) -> String {
    let n = bytes.len();
    let from = from.min(n);
    let pos = |rng: &mut Rng| {
        if n == from {
            from
        } else if rng.chance(0.5) {
            from + rng.below((n - from).min(64))
        } else {
            from + rng.below(n - from)
        }
    };
    match rng.below(11) {
        _ if n == 0 => {
            let len = rng.range(1, 16);
            bytes.extend((0..len).map(|_| rng.next_u64() as u8));
            "random bytes into an empty file".into()
        }
        0 => {
            let p = pos(rng).min(n - 1);
            bytes[p] ^= 1 << rng.below(8);
            format!("bit flip at {p}")
        }
        1 => {
            let p = pos(rng).min(n - 1);
            bytes[p] = rng.next_u64() as u8;
            format!("random byte at {p}")
        }
        2 => {
            let p = pos(rng).min(n - 1);
            bytes[p] = *rng.pick(&[0u8, 0xFF, 0x7F, 0x80, b'\n', b'"', b'{', b'}', b'-']);
            format!("edge byte at {p}")
        }
        3 => {
            let p = rng.below(n);
            bytes.truncate(p);
            format!("truncated to {p}")
        }
        4 => {
            let p = rng.below(n);
            let len = rng.range(1, 64).min(n - p);
            bytes.drain(p..p + len);
            format!("{len} bytes removed at {p}")
        }
        5 => {
            let p = rng.below(n);
            let len = rng.range(1, 64).min(n - p);
            let chunk: Vec<u8> = bytes[p..p + len].to_vec();
            let at = rng.below(n + 1);
            bytes.splice(at..at, chunk);
            format!("{len} bytes from {p} copied to {at}")
        }
        6 => {
            let at = pos(rng);
            let len = rng.range(1, 16);
            let chunk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            bytes.splice(at..at, chunk);
            format!("{len} random bytes inserted at {at}")
        }
        7 => {
            let width = *rng.pick(&[2usize, 4, 8]);
            let p = pos(rng).min(n.saturating_sub(width));
            let v = *rng.pick(INTERESTING_U64);
            let le = v.to_le_bytes();
            let be = v.to_be_bytes();
            let big = rng.chance(0.5);
            for k in 0..width.min(n - p) {
                bytes[p + k] = if big { be[8 - width + k] } else { le[k] };
            }
            format!(
                "{}-byte {} {v:#x} at {p}",
                width,
                if big { "BE" } else { "LE" }
            )
        }
        8 => {
            let p = pos(rng).min(n - 1);
            let d = *rng.pick(&[1i16, -1, 16, -16, 128]);
            bytes[p] = (i16::from(bytes[p]) + d) as u8;
            format!("byte at {p} {d:+}")
        }
        9 => {
            let a = rng.below(n);
            let b = rng.below(n);
            bytes.swap(a, b);
            format!("bytes {a} and {b} swapped")
        }
        _ => {
            let extra = rng.range(1, 256);
            bytes.extend((0..extra).map(|_| rng.next_u64() as u8));
            format!("{extra} random bytes appended")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Line-level mutations: an editor's mistakes in a text file.

/// Applies one line-level mutation to text (removing, repeating, swapping, splitting lines).
pub fn mutate_lines(rng: &mut Rng, text: &str) -> (String, String) {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        return ("\n".into(), "an empty file gets a newline".into());
    }
    let n = lines.len();
    let i = rng.below(n);
    let how = match rng.below(6) {
        0 => {
            lines.remove(i);
            format!("line {} removed", i + 1)
        }
        1 => {
            let l = lines[i].clone();
            let at = rng.below(n + 1);
            lines.insert(at, l);
            format!("line {} repeated at {}", i + 1, at + 1)
        }
        2 => {
            let j = rng.below(n);
            lines.swap(i, j);
            format!("lines {} and {} swapped", i + 1, j + 1)
        }
        3 => {
            let l = &lines[i];
            let cut = floor_char(l, rng.below(l.len() + 1));
            let (a, b) = l.split_at(cut);
            let (a, b) = (a.to_string(), b.to_string());
            lines[i] = a;
            lines.insert(i + 1, b);
            format!("line {} split at {cut}", i + 1)
        }
        4 => {
            let l = &lines[i];
            let cut = floor_char(l, rng.below(l.len() + 1));
            lines[i].truncate(cut);
            format!("line {} cut at {cut}", i + 1)
        }
        _ => {
            lines.truncate(i);
            format!("only the first {i} lines kept")
        }
    };
    let mut out = lines.join("\n");
    if rng.chance(0.8) {
        out.push('\n');
    }
    (out, how)
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

// ---------------------------------------------------------------------------------------------
// JSON-level mutations: a file that is still JSON, with keys missing, values of the wrong type
// or out of range, entries swapped or repeated.

/// Values every JSON field should be tried with.
pub fn interesting_json(rng: &mut Rng) -> Json {
    let choices: [fn(&mut Rng) -> Json; 28] = [
        |_| Json::Null,
        |_| Json::Bool(true),
        |_| Json::Bool(false),
        |_| 0.into(),
        |_| 1.into(),
        |_| (-1).into(),
        |_| 2.into(),
        |_| 3.into(),
        |_| 7.into(),
        |_| 1000.into(),
        |_| u32::MAX.into(),
        |_| u64::MAX.into(),
        |_| i64::MIN.into(),
        |_| 1e300.into(),
        |_| (-1e300).into(),
        |_| 0.5.into(),
        |_| (-0.5).into(),
        |_| 1e-300.into(),
        |_| "".into(),
        |_| "NaN".into(),
        |_| "inf".into(),
        |_| "-1".into(),
        |_| "line\nbreak".into(),
        |_| "../../..".into(),
        |_| "/".into(),
        |_| Json::Array(vec![]),
        |_| Json::Object(Map::new()),
        |rng| Json::String("x".repeat(rng.range(1, 3000))),
    ];
    rng.pick(&choices)(rng)
}

/// Paths to every value in `v` (object keys and array indices), the root excluded.
fn paths(v: &Json, prefix: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    match v {
        Json::Object(m) => {
            for (k, c) in m {
                prefix.push(PathStep::Key(k.clone()));
                out.push(prefix.clone());
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        Json::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(PathStep::Index(i));
                out.push(prefix.clone());
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug, PartialEq)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at_mut<'a>(v: &'a mut Json, path: &[PathStep]) -> Option<&'a mut Json> {
    path.iter().try_fold(v, |v, step| match step {
        PathStep::Key(k) => v.get_mut(k),
        PathStep::Index(i) => v.get_mut(*i),
    })
}

fn show(path: &[PathStep]) -> String {
    path.iter()
        .map(|s| match s {
            PathStep::Key(k) => format!(".{k}"),
            PathStep::Index(i) => format!("[{i}]"),
        })
        .collect()
}

/// Applies one JSON-level mutation to `v` at a random place; returns its name.
pub fn mutate_json(rng: &mut Rng, v: &mut Json) -> String {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    if all.is_empty() {
        *v = interesting_json(rng);
        return "the whole document replaced".into();
    }
    let p = rng.pick(&all).clone();
    let shown = show(&p);
    match rng.below(10) {
        0 | 1 => {
            // Remove the entry.
            let (last, parent) = p.split_last().expect("non-empty path");
            let parent = at_mut(v, parent).expect("path exists");
            match (parent, last) {
                (Json::Object(m), PathStep::Key(k)) => {
                    m.remove(k);
                }
                (Json::Array(a), PathStep::Index(i)) => {
                    a.remove(*i);
                }
                _ => {}
            }
            format!("{shown} removed")
        }
        2..=4 => {
            let new = interesting_json(rng);
            let desc = preview(new.to_string().as_bytes(), 40);
            *at_mut(v, &p).expect("path exists") = new;
            format!("{shown} = {desc}")
        }
        5 => {
            // Swap with another value of the document.
            let q = rng.pick(&all).clone();
            let a = at_mut(v, &p).expect("path exists").clone();
            let b = at_mut(v, &q).map(|x| x.clone());
            let Some(b) = b else {
                return format!("{shown} kept");
            };
            let b_is_inside_a = q.starts_with(&p) || p.starts_with(&q);
            if b_is_inside_a {
                *at_mut(v, &p).expect("path exists") = b;
                return format!("{shown} = the value of {}", show(&q));
            }
            *at_mut(v, &p).expect("path exists") = b;
            if let Some(x) = at_mut(v, &q) {
                *x = a;
            }
            format!("{shown} and {} swapped", show(&q))
        }
        6 => {
            let target = at_mut(v, &p).expect("path exists");
            let desc = match target {
                Json::Number(n) => {
                    let x = n.as_f64().unwrap_or(0.0);
                    let new: Json = match rng.below(6) {
                        0 => (-x).into(),
                        1 => (x * 1e6).into(),
                        2 => (x + 1.0).into(),
                        3 => (x - 1.0).into(),
                        4 => (x / 3.0).into(),
                        _ => (x.trunc() as i64).wrapping_mul(1 << 40).into(),
                    };
                    let d = new.to_string();
                    *target = new;
                    d
                }
                Json::String(s) => {
                    let new = match rng.below(5) {
                        0 => s.to_uppercase(),
                        1 => format!("{s}{s}"),
                        2 => s.chars().rev().collect(),
                        3 => format!(" {s}"),
                        _ => s.chars().take(s.chars().count() / 2).collect(),
                    };
                    let d = preview(new.as_bytes(), 40);
                    *s = new;
                    d
                }
                Json::Array(a) if !a.is_empty() => {
                    let i = rng.below(a.len());
                    let item = a[i].clone();
                    a.push(item);
                    "one more element".into()
                }
                Json::Bool(b) => {
                    *b = !*b;
                    "negated".into()
                }
                other => {
                    *other = Json::Array(vec![other.clone()]);
                    "wrapped in a list".into()
                }
            };
            format!("{shown} changed: {desc}")
        }
        7 => {
            // A value that is a number where text goes, a list where a number goes, ...
            let target = at_mut(v, &p).expect("path exists");
            let new = match target.clone() {
                Json::Number(n) => Json::String(n.to_string()),
                Json::String(s) => s
                    .parse::<f64>()
                    .map(Json::from)
                    .unwrap_or(Json::Array(vec![Json::String(s)])),
                Json::Array(a) => a.first().cloned().unwrap_or(Json::Null),
                Json::Object(m) => Json::Array(m.values().cloned().collect()),
                other => Json::Object(Map::from_iter([("value".to_string(), other)])),
            };
            *target = new;
            format!("{shown} changes type")
        }
        8 => {
            // An entry nobody expects, beside this one.
            let (_, parent) = p.split_last().expect("non-empty path");
            match at_mut(v, parent) {
                Some(Json::Object(m)) => {
                    let k = format!("unexpected_{}", rng.below(100));
                    m.insert(k.clone(), interesting_json(rng));
                    format!("{}.{k} added", show(parent))
                }
                Some(Json::Array(a)) => {
                    a.push(interesting_json(rng));
                    format!("{} gets an extra element", show(parent))
                }
                _ => "nothing".into(),
            }
        }
        _ => {
            // Empty the container or the string.
            let target = at_mut(v, &p).expect("path exists");
            match target {
                Json::Object(m) => m.clear(),
                Json::Array(a) => a.clear(),
                Json::String(s) => s.clear(),
                other => *other = Json::Null,
            }
            format!("{shown} emptied")
        }
    }
}

/// Writes `v` as JSON text, repeating one randomly chosen object member (with the same or
/// another value) when `duplicate`, which `serde_json::Value` cannot hold but a file can.
pub fn json_text(rng: &mut Rng, v: &Json, duplicate: bool) -> (String, Option<String>) {
    let mut objects = 0;
    count_objects(v, &mut objects);
    let target = duplicate.then(|| rng.below(objects.max(1)));
    let mut out = String::new();
    let mut seen = 0;
    let mut note = None;
    write_json(rng, v, target, &mut seen, &mut out, &mut note);
    (out, note)
}

fn count_objects(v: &Json, n: &mut usize) {
    match v {
        Json::Object(m) => {
            *n += 1;
            m.values().for_each(|c| count_objects(c, n));
        }
        Json::Array(a) => a.iter().for_each(|c| count_objects(c, n)),
        _ => {}
    }
}

fn write_json(
    rng: &mut Rng,
    v: &Json,
    target: Option<usize>,
    seen: &mut usize,
    out: &mut String,
    note: &mut Option<String>,
) {
    match v {
        Json::Object(m) => {
            let this = *seen;
            *seen += 1;
            let mut members: Vec<(String, Json)> =
                m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            if target == Some(this) && !members.is_empty() {
                let i = rng.below(members.len());
                let (k, val) = members[i].clone();
                let val = if rng.chance(0.5) {
                    val
                } else {
                    interesting_json(rng)
                };
                *note = Some(format!("key `{k}` repeated"));
                let at = rng.below(members.len() + 1);
                members.insert(at, (k, val));
            }
            out.push('{');
            for (i, (k, c)) in members.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(rng, c, target, seen, out, note);
            }
            out.push('}');
        }
        Json::Array(a) => {
            out.push('[');
            for (i, c) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(rng, c, target, seen, out, note);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A mutated JSON document: 1-3 structural mutations, then maybe a repeated key, then maybe
/// byte-level damage. The usual mix of every JSON target.
pub fn mutated_json(rng: &mut Rng, seed: &Json) -> (Vec<u8>, Vec<String>) {
    let mut v = seed.clone();
    let mut how = Vec::new();
    for _ in 0..rng.range(1, 3) {
        how.push(mutate_json(rng, &mut v));
    }
    let duplicate = rng.chance(0.15);
    let (text, dup) = json_text(rng, &v, duplicate);
    how.extend(dup);
    let mut bytes = text.into_bytes();
    if rng.chance(0.2) {
        how.push(mutate_bytes(rng, &mut bytes));
    }
    (bytes, how)
}

/// A case with some facts of how to run it beside the files.
impl<A, B, I: Input> Input for (A, B, I) {
    fn describe(&self) -> String {
        self.2.describe()
    }

    fn save(&self, dir: &Path) {
        self.2.save(dir)
    }
}

/// Runs `f` on its own thread and fails the test if it takes longer than [`CASE_LIMIT`]: for
/// the regression tests of inputs that used to hang (the thread is left behind).
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(CASE_LIMIT) {
        Ok(v) => v,
        Err(_) => panic!("{what}: still running after {} s", CASE_LIMIT.as_secs()),
    }
}
