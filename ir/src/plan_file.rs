//! The plan file (`plan.bin`): a versioned binary container for a [`Plan`], the target it was
//! compiled for, and the native code it carries.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic         8 bytes  "MMCPLAN\0"
//! version       u32      PLAN_FORMAT_VERSION
//! target        u16 length, then that many bytes of UTF-8 ("interpreter", "cpu-x86_64 ...")
//! sections      u32 count, then per section:
//!                 kind u32, offset u64, length u64, SHA-256 of its bytes (32)
//! header digest 32 bytes: SHA-256 of every byte above
//! sections      their bytes, in table order, back to back; the file ends with the last one
//! ```
//!
//! The sections are the plan body (the [`Plan`] in postcard, a compact serde format with a
//! stable, documented wire format) and, optionally, a native library: the bytes of a shared
//! library whose kernels the plan's steps launch. The library lives inside the plan so that a
//! plan copied to another folder or host carries its code; [`NativeLibrary::extract`] writes it
//! to a private temporary file for `libloading` to open once its hash is checked again.
//!
//! Reading checks, in order, and stops at the first fault: the magic (not a plan), the version
//! (another format, also the text format of earlier mmc), the header's length (a file cut
//! short inside it), the header digest, each section's extent (cut short: how many bytes are
//! missing), trailing bytes, each section's hash (naming the damaged section), then the body.
//! The target is checked by the runtime, which knows what it runs on
//! ([`PlanFile::check_target`]).
//!
//! A plan is a program: its native library is machine code that `mmc run` executes. Plans from
//! untrusted sources must not be run, as pickled PyTorch checkpoints must not be loaded; the
//! hashes find damage and swapped files, not a malicious author.

use crate::plan::{Plan, PlanError, PLAN_FORMAT_VERSION};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The first bytes of every plan file.
pub const MAGIC: [u8; 8] = *b"MMCPLAN\0";

/// How the plan files of mmc up to format 3 began (a text line, then JSON): recognised only to
/// name their version when refusing them.
const TEXT_MAGIC: &[u8] = b"mmc-plan ";

/// The target of a plan without native code: the reference interpreter runs it on any host.
pub const INTERPRETER_TARGET: &str = "interpreter";

/// At most this many sections; a larger count is a damaged header, not an allocation.
const MAX_SECTIONS: u32 = 64;

/// Bytes of one section-table entry: kind, offset, length, SHA-256.
const ENTRY_BYTES: usize = 4 + 8 + 8 + 32;

/// The name of a plan compiled to native code for `cpu` with `features` (LLVM's names, such as
/// `+avx2,-avx512f`) on `arch` (such as `x86_64`): `cpu-<arch> <cpu> <features>`, the features
/// reduced to the enabled ones, sorted, so that two machines with the same CPU and features get
/// the same name whatever order LLVM lists them in.
pub fn cpu_target(arch: &str, cpu: &str, features: &str) -> String {
    let mut on: Vec<&str> = features
        .split(',')
        .map(str::trim)
        .filter(|f| f.starts_with('+'))
        .collect();
    on.sort_unstable();
    on.dedup();
    format!("cpu-{arch} {cpu} {}", on.join(","))
        .trim_end()
        .to_string()
}

/// A CPU target's parts: architecture, CPU name, enabled features.
fn cpu_parts(target: &str) -> Option<(&str, &str, Vec<&str>)> {
    let rest = target.strip_prefix("cpu-")?;
    let mut words = rest.splitn(3, ' ');
    let arch = words.next()?;
    let cpu = words.next().unwrap_or("");
    let features = words
        .next()
        .map(|f| f.split(',').filter(|f| !f.is_empty()).collect())
        .unwrap_or_default();
    Some((arch, cpu, features))
}

/// What differs between the plan's target and the host's, in words, for the refusal.
fn target_difference(plan: &str, host: &str) -> String {
    let (Some((pa, pc, pf)), Some((ha, hc, hf))) = (cpu_parts(plan), cpu_parts(host)) else {
        return "another kind of target".into();
    };
    if pa != ha {
        return format!("built for {pa}, this machine is {ha}");
    }
    let mut out = Vec::new();
    if pc != hc {
        out.push(format!("built for CPU `{pc}`, this one is `{hc}`"));
    }
    let missing: Vec<&str> = pf.iter().filter(|f| !hf.contains(f)).copied().collect();
    if !missing.is_empty() {
        out.push(format!("features this CPU lacks: {}", missing.join(",")));
    }
    let extra = hf.iter().filter(|f| !pf.contains(f)).count();
    if extra > 0 {
        out.push(format!(
            "{extra} feature(s) of this CPU the plan was not built with"
        ));
    }
    out.join("; ")
}

/// What a section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    /// The [`Plan`], in postcard.
    Body,
    /// A shared library of generated kernels ([`NativeLibrary`]).
    NativeLibrary,
    /// The compiled programs' steps and kernel table, in the backend's own encoding
    /// ([`PlanFile::steps`]).
    Steps,
}

impl SectionKind {
    fn code(self) -> u32 {
        match self {
            SectionKind::Body => 1,
            SectionKind::NativeLibrary => 2,
            SectionKind::Steps => 3,
        }
    }

    fn from_code(code: u32) -> Option<SectionKind> {
        match code {
            1 => Some(SectionKind::Body),
            2 => Some(SectionKind::NativeLibrary),
            3 => Some(SectionKind::Steps),
            _ => None,
        }
    }

    /// The section's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Body => "plan body",
            SectionKind::NativeLibrary => "native library",
            SectionKind::Steps => "compiled steps",
        }
    }
}

/// The SHA-256 of `bytes`, in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a shared library that a plan carries, with their SHA-256 (the hash the plan
/// records: the loader opens the library only when the file it opens has it).
#[derive(Clone, PartialEq, Eq)]
pub struct NativeLibrary {
    bytes: Vec<u8>,
    sha256: String,
}

impl std::fmt::Debug for NativeLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeLibrary")
            .field("bytes", &self.bytes.len())
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// Why a native library could not be handed to the loader.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("writing the plan's native library to a temporary file in {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the native library at {} has SHA-256 {got}, but the plan records {want}: refusing to load a changed library", path.display())]
    Hash {
        path: PathBuf,
        want: String,
        got: String,
    },
}

impl NativeLibrary {
    /// A library from its bytes (a linked `.so`), hashed here.
    pub fn new(bytes: Vec<u8>) -> NativeLibrary {
        let sha256 = sha256_hex(&bytes);
        NativeLibrary { bytes, sha256 }
    }

    /// The library's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The SHA-256 the plan records for the library, lower-case hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Writes the library to a private temporary file (mode 0600, a fresh name) in the system's
    /// temporary folder (`TMPDIR`), checks the file's hash, and returns it for the loader.
    pub fn extract(&self) -> Result<ExtractedLibrary, LibraryError> {
        self.extract_in(&std::env::temp_dir())
    }

    /// [`NativeLibrary::extract`] into `dir`, for hosts whose temporary folder is mounted
    /// `noexec` (the loader cannot map code from there).
    pub fn extract_in(&self, dir: &Path) -> Result<ExtractedLibrary, LibraryError> {
        let io = |source| LibraryError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        let mut file = tempfile::Builder::new()
            .prefix("mmc-kernels-")
            .suffix(".so")
            .tempfile_in(dir)
            .map_err(io)?;
        file.write_all(&self.bytes).map_err(io)?;
        file.flush().map_err(io)?;
        let extracted = ExtractedLibrary {
            file,
            sha256: self.sha256.clone(),
        };
        extracted.check()?;
        Ok(extracted)
    }
}

/// A plan's native library written to a private temporary file, removed when this is dropped
/// (a library the loader has opened stays mapped after that).
#[derive(Debug)]
pub struct ExtractedLibrary {
    file: tempfile::NamedTempFile,
    sha256: String,
}

impl ExtractedLibrary {
    /// Where the library is, for `libloading::Library::new`.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The SHA-256 the plan records.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Reads the file back and checks that its SHA-256 is the one the plan records: call it
    /// right before opening the library, so that a file changed since extraction is refused.
    pub fn check(&self) -> Result<(), LibraryError> {
        let path = self.path().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| LibraryError::Io {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            source,
        })?;
        let got = sha256_hex(&bytes);
        if got != self.sha256 {
            return Err(LibraryError::Hash {
                path,
                want: self.sha256.clone(),
                got,
            });
        }
        Ok(())
    }
}

/// Everything a plan file holds: the plan, the target it was compiled for, and its native code.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanFile {
    pub plan: Plan,
    /// The machine the native code is for ([`cpu_target`]), or [`INTERPRETER_TARGET`].
    pub target: String,
    /// The kernels the plan's steps launch; `None` for an interpreter plan.
    pub native: Option<NativeLibrary>,
    /// The compiled programs (steps over buffer locations, and the kernel table), encoded by
    /// the backend that wrote them (`mmc_codegen::compiled`); present exactly when `native`
    /// is.
    pub steps: Option<Vec<u8>>,
}

impl PlanFile {
    /// A plan without native code, for the interpreter.
    pub fn interpreter(plan: Plan) -> PlanFile {
        PlanFile {
            plan,
            target: INTERPRETER_TARGET.into(),
            native: None,
            steps: None,
        }
    }

    /// Serialises the file: header, section table, body, library.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(
            &self.plan,
            &self.target,
            self.native.as_ref(),
            self.steps.as_deref(),
        )
    }

    /// Writes the file; it appears complete or not at all (a temporary file beside it, synced,
    /// then renamed into place).
    pub fn write(&self, path: &Path) -> Result<(), PlanError> {
        write_atomically(path, &self.to_bytes())
    }

    /// Reads and checks a plan file written by [`PlanFile::write`] or [`Plan::write`].
    pub fn read(path: &Path) -> Result<PlanFile, PlanError> {
        let bytes = std::fs::read(path).map_err(|source| PlanError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses plan-file bytes; `path` names the file in errors. See the module's doc for the
    /// order of the checks.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<PlanFile, PlanError> {
        let raw = RawPlanFile::parse(path, bytes)?;
        let damaged = |message: String| PlanError::Malformed {
            path: path.to_path_buf(),
            message,
        };
        for kind in [
            SectionKind::Body,
            SectionKind::NativeLibrary,
            SectionKind::Steps,
        ] {
            if raw.sections.iter().filter(|s| s.0 == kind).count() > 1 {
                return Err(damaged(format!("it has two {} sections", kind.name())));
            }
        }
        let body = raw
            .section(SectionKind::Body)
            .ok_or_else(|| damaged("it has no plan body section".into()))?;
        let native = raw
            .section(SectionKind::NativeLibrary)
            .map(|bytes| NativeLibrary::new(bytes.to_vec()));
        if raw.target == INTERPRETER_TARGET && native.is_some() {
            return Err(damaged(
                "an interpreter plan carries a native library".into(),
            ));
        }
        let steps = raw.section(SectionKind::Steps).map(<[u8]>::to_vec);
        if steps.is_some() != native.is_some() {
            return Err(damaged(
                "it has a native library without compiled steps, or steps without a library".into(),
            ));
        }
        let plan = Plan::from_body(path, body)?;
        Ok(PlanFile {
            plan,
            target: raw.target,
            native,
            steps,
        })
    }

    /// Checks that the plan can run on `host`, the target the runtime executes
    /// ([`cpu_target`] of its CPU, or [`INTERPRETER_TARGET`]): the same target, or a plan for
    /// the interpreter, which holds no native code and runs anywhere. A plan compiled for
    /// another CPU, other CPU features or another kind of target is refused with both names.
    /// (Running a compiled plan's IR on the interpreter needs no check: [`Plan::read`].)
    pub fn check_target(&self, path: &Path, host: &str) -> Result<(), PlanError> {
        if self.target == host || (self.target == INTERPRETER_TARGET && self.native.is_none()) {
            return Ok(());
        }
        Err(PlanError::Target {
            path: path.to_path_buf(),
            plan: self.target.clone(),
            host: host.to_string(),
            difference: target_difference(&self.target, host),
        })
    }
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), PlanError> {
    let io = |source| PlanError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The bytes of a plan file holding `plan`, compiled for `target`, with `native` code.
pub(crate) fn encode(
    plan: &Plan,
    target: &str,
    native: Option<&NativeLibrary>,
    steps: Option<&[u8]>,
) -> Vec<u8> {
    let body = postcard::to_allocvec(plan).expect("a plan serialises (its paths are UTF-8)");
    let mut sections: Vec<(SectionKind, &[u8])> = vec![(SectionKind::Body, &body)];
    if let Some(lib) = native {
        sections.push((SectionKind::NativeLibrary, lib.bytes()));
    }
    if let Some(steps) = steps {
        sections.push((SectionKind::Steps, steps));
    }
    RawPlanFile {
        target: target.to_string(),
        sections,
    }
    .to_bytes()
}

/// A plan file taken apart but not decoded: its target and its sections' bytes, in file order.
/// [`PlanFile`] is what the compiler and runtime use; this level serves tools and tests that
/// look at or assemble the sections themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPlanFile<'a> {
    pub target: String,
    pub sections: Vec<(SectionKind, &'a [u8])>,
}

impl<'a> RawPlanFile<'a> {
    /// Checks the container (magic, version, header, the sections' extents and hashes, no
    /// trailing bytes) and returns its parts; `path` names the file in errors.
    pub fn parse(path: &Path, bytes: &'a [u8]) -> Result<RawPlanFile<'a>, PlanError> {
        let header = Header::parse(path, bytes)?;
        Ok(RawPlanFile {
            target: header.target,
            sections: header
                .sections
                .iter()
                .map(|s| {
                    let start = s.offset as usize;
                    (s.kind, &bytes[start..start + s.length as usize])
                })
                .collect(),
        })
    }

    /// The bytes of the first section of `kind`.
    pub fn section(&self, kind: SectionKind) -> Option<&'a [u8]> {
        self.sections.iter().find(|s| s.0 == kind).map(|s| s.1)
    }

    /// Assembles the file: the header with this format version, the target, the section table
    /// with each section's SHA-256 and the header's digest, then the sections back to back.
    pub fn to_bytes(&self) -> Vec<u8> {
        let target = &self.target;
        let target_len = u16::try_from(target.len())
            .expect("a target name is at most 64 KiB (cpu_target names a CPU and its features)");
        assert!(
            self.sections.len() <= MAX_SECTIONS as usize,
            "at most {MAX_SECTIONS} sections"
        );
        let header_len =
            MAGIC.len() + 4 + 2 + target.len() + 4 + self.sections.len() * ENTRY_BYTES + 32;
        let total = header_len + self.sections.iter().map(|s| s.1.len()).sum::<usize>();
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PLAN_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&target_len.to_le_bytes());
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        let mut offset = header_len as u64;
        for (kind, data) in &self.sections {
            out.extend_from_slice(&kind.code().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(&Sha256::digest(data));
            offset += data.len() as u64;
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        debug_assert_eq!(out.len(), header_len);
        for (_, data) in &self.sections {
            out.extend_from_slice(data);
        }
        out
    }
}

/// One entry of the section table.
struct SectionEntry {
    kind: SectionKind,
    offset: u64,
    length: u64,
}

/// A parsed, checked header: every section lies inside the file and has its hash.
struct Header {
    target: String,
    sections: Vec<SectionEntry>,
}

/// Reads the header's fields in order; running out of bytes is a truncation inside the header.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    at: usize,
    /// Where the header ends, once the section count says.
    header_end: Option<usize>,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PlanError> {
        let end = self.at + n;
        if end > self.bytes.len() {
            return Err(PlanError::Truncated {
                path: self.path.to_path_buf(),
                part: format!("header ({what})"),
                missing: (end.max(self.header_end.unwrap_or(0)) - self.bytes.len()) as u64,
                exact: false,
            });
        }
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, PlanError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, PlanError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, PlanError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

impl Header {
    fn parse(path: &Path, bytes: &[u8]) -> Result<Header, PlanError> {
        let p = || path.to_path_buf();
        let damaged = |message: String| PlanError::Malformed { path: p(), message };
        let damaged_header = || PlanError::Section {
            path: p(),
            section: "header",
        };
        if let Some(rest) = bytes.strip_prefix(TEXT_MAGIC) {
            let word: String = rest
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric())
                .take(20)
                .map(|&b| b as char)
                .collect();
            return Err(PlanError::Version {
                path: p(),
                found: format!("{word} (the text format of earlier mmc)"),
            });
        }
        if bytes.is_empty() || !(bytes.starts_with(&MAGIC) || MAGIC.starts_with(bytes)) {
            return Err(PlanError::NotAPlan { path: p() });
        }
        let mut c = Cursor {
            path,
            bytes,
            at: 0,
            header_end: None,
        };
        c.take(MAGIC.len(), "magic")?;
        let version = c.u32("format version")?;
        if version != PLAN_FORMAT_VERSION {
            return Err(PlanError::Version {
                path: p(),
                found: version.to_string(),
            });
        }
        let target_len = c.u16("target")? as usize;
        let target = c.take(target_len, "target")?;
        let count = c.u32("section count")?;
        if count > MAX_SECTIONS {
            return Err(damaged_header());
        }
        c.header_end = Some(c.at + count as usize * ENTRY_BYTES + 32);
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let kind = c.u32("section table")?;
            let offset = c.u64("section table")?;
            let length = c.u64("section table")?;
            let hash = c.take(32, "section table")?;
            entries.push((kind, offset, length, hash));
        }
        let table_end = c.at;
        let digest = c.take(32, "header digest")?;
        if !digest_matches(&bytes[..table_end], digest) {
            return Err(damaged_header());
        }
        let target = std::str::from_utf8(target)
            .map_err(|_| damaged("its target name is not UTF-8".into()))?
            .to_string();
        // Sections back to back after the header; the file ends with the last one.
        let mut end = c.at as u64;
        let mut sections = Vec::with_capacity(entries.len());
        for &(code, offset, length, _) in &entries {
            let kind = SectionKind::from_code(code).ok_or_else(|| {
                damaged(format!("its header lists a section of unknown kind {code}"))
            })?;
            if offset != end {
                return Err(damaged(format!(
                    "its {} section starts at byte {offset}, not at byte {end} after the one before",
                    kind.name()
                )));
            }
            end = offset
                .checked_add(length)
                .ok_or_else(|| damaged(format!("its {} section is too long", kind.name())))?;
            sections.push(SectionEntry {
                kind,
                offset,
                length,
            });
        }
        let len = bytes.len() as u64;
        if let Some(cut) = sections.iter().find(|s| s.offset + s.length > len) {
            return Err(PlanError::Truncated {
                path: p(),
                part: format!("{} section", cut.kind.name()),
                missing: end - len,
                exact: true,
            });
        }
        if len > end {
            return Err(PlanError::TrailingBytes {
                path: p(),
                extra: len - end,
            });
        }
        for (s, &(_, _, _, hash)) in sections.iter().zip(&entries) {
            let data = &bytes[s.offset as usize..(s.offset + s.length) as usize];
            if !digest_matches(data, hash) {
                return Err(PlanError::Section {
                    path: p(),
                    section: s.kind.name(),
                });
            }
        }
        Ok(Header { target, sections })
    }
}

fn digest_matches(data: &[u8], digest: &[u8]) -> bool {
    Sha256::digest(data).as_slice() == digest
}
