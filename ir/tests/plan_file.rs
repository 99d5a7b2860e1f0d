//! The plan file (`plan.bin`): the binary container round-trips a plan with and without its
//! native library, refuses every kind of damage with its own one-line error naming the file
//! (not a plan, another format version, another target, cut short anywhere, a changed byte in
//! any section, bytes after the end), and a plan copied elsewhere still loads and hands its
//! library to the loader intact.

mod common;

use common::plan;
use mmc_ir::plan::{Plan, PlanError, PLAN_FORMAT_VERSION};
use mmc_ir::plan_file::{
    cpu_target, sha256_hex, LibraryError, NativeLibrary, PlanFile, RawPlanFile, SectionKind,
    INTERPRETER_TARGET, MAGIC,
};
use std::path::Path;

const PATH: &str = "some/dir/plan.bin";

/// Bytes that stand for a linked shared library: every byte value, so that no byte is special.
fn library_bytes() -> Vec<u8> {
    let mut b = b"\x7fELF\x02\x01\x01".to_vec();
    b.extend((0..=255u8).cycle().take(1000));
    b
}

fn target() -> String {
    cpu_target("x86_64", "znver3", "+avx2,+fma,-avx512f,+avx")
}

/// A plan compiled for `target()`, with a native library.
fn native_file() -> PlanFile {
    PlanFile {
        plan: plan(),
        target: target(),
        native: Some(NativeLibrary::new(library_bytes())),
        steps: Some(b"the backend's steps".to_vec()),
    }
}

fn read(bytes: &[u8]) -> Result<PlanFile, PlanError> {
    let r = PlanFile::from_bytes(Path::new(PATH), bytes);
    if let Err(e) = &r {
        let s = e.to_string();
        assert!(s.starts_with(PATH) && !s.contains('\n'), "{s}");
    }
    r
}

/// Where the sections start: the header's length.
fn header_len(bytes: &[u8]) -> usize {
    let raw = RawPlanFile::parse(Path::new(PATH), bytes).unwrap();
    bytes.len() - raw.sections.iter().map(|s| s.1.len()).sum::<usize>()
}

#[test]
fn a_plan_round_trips_with_and_without_a_library() {
    let p = plan();
    let bytes = p.to_bytes();
    assert_eq!(&bytes[..8], &MAGIC);
    assert_eq!(&bytes[8..12], &PLAN_FORMAT_VERSION.to_le_bytes());
    assert_eq!(PLAN_FORMAT_VERSION, 5);
    let back = read(&bytes).unwrap();
    assert_eq!(back, PlanFile::interpreter(p.clone()));
    assert_eq!(back.to_bytes(), bytes, "writing is deterministic");
    assert_eq!(Plan::from_bytes(Path::new(PATH), &bytes).unwrap(), p);

    let f = native_file();
    let bytes = f.to_bytes();
    let back = read(&bytes).unwrap();
    assert_eq!(back, f);
    let lib = back.native.as_ref().unwrap();
    assert_eq!(lib.bytes(), library_bytes());
    assert_eq!(lib.sha256(), sha256_hex(&library_bytes()));
    // The section table records the library's hash; the library is the section's bytes.
    let raw = RawPlanFile::parse(Path::new(PATH), &bytes).unwrap();
    assert_eq!(raw.target, target());
    assert_eq!(
        raw.sections.iter().map(|s| s.0).collect::<Vec<_>>(),
        [
            SectionKind::Body,
            SectionKind::NativeLibrary,
            SectionKind::Steps
        ]
    );
    assert_eq!(
        raw.section(SectionKind::NativeLibrary).unwrap(),
        library_bytes()
    );
    // The interpreter reads the IR of a compiled plan, whatever its target.
    assert_eq!(Plan::from_bytes(Path::new(PATH), &bytes).unwrap(), plan());
}

#[test]
fn cpu_targets_name_the_enabled_features_in_order() {
    assert_eq!(target(), "cpu-x86_64 znver3 +avx,+avx2,+fma");
    assert_eq!(
        cpu_target("x86_64", "znver3", "+fma, +avx,+avx2,-sse4a"),
        target()
    );
    assert_eq!(cpu_target("x86_64", "x86-64", ""), "cpu-x86_64 x86-64");
}

#[test]
fn a_plan_copied_to_another_folder_loads_and_its_library_extracts_intact() {
    let compiled = tempfile::tempdir().unwrap();
    let first = compiled.path().join("plan.bin");
    native_file().write(&first).unwrap();
    // Written through a temporary file that is renamed away.
    let names: Vec<_> = std::fs::read_dir(compiled.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["plan.bin"]);
    let bytes = std::fs::read(&first).unwrap();
    let folder = compiled.path().to_str().unwrap().as_bytes();
    assert!(
        !bytes.windows(folder.len()).any(|w| w == folder),
        "the plan names the folder it was written to"
    );

    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("deeper/copy.bin");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(&first, &copy).unwrap();
    drop(compiled);
    let f = PlanFile::read(&copy).unwrap();
    assert_eq!(f, native_file());
    f.check_target(&copy, &target()).unwrap();

    let lib = f.native.as_ref().unwrap();
    let out = lib.extract_in(elsewhere.path()).unwrap();
    assert_eq!(std::fs::read(out.path()).unwrap(), library_bytes());
    assert_eq!(out.sha256(), sha256_hex(&library_bytes()));
    out.check().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the library file is private: {mode:o}");
    }
    // A file changed after extraction is refused before the loader opens it.
    let path = out.path().to_path_buf();
    let mut changed = library_bytes();
    changed[100] ^= 1;
    std::fs::write(&path, &changed).unwrap();
    let e = out.check().unwrap_err();
    assert!(matches!(e, LibraryError::Hash { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(lib.sha256()) && msg.contains(&sha256_hex(&changed)),
        "{msg}"
    );
    drop(out);
    assert!(
        !path.exists(),
        "the extracted library is removed when dropped"
    );
    // The default place is the system's temporary folder.
    let out = lib.extract().unwrap();
    assert!(out.path().starts_with(std::env::temp_dir()));
    assert_eq!(std::fs::read(out.path()).unwrap(), library_bytes());
}

#[test]
fn what_is_not_a_plan_is_refused() {
    for bytes in [
        &b""[..],
        b"hello",
        b"\x7fELF\x02\x01\x01\x00",
        b"MMCPLAX\0\x04\0\0\0",
    ] {
        let e = read(bytes).unwrap_err();
        assert!(matches!(e, PlanError::NotAPlan { .. }), "{e}");
        assert!(e.to_string().contains("not an mmc plan"), "{e}");
    }
}

#[test]
fn a_plan_of_another_format_version_is_refused_naming_both() {
    let bytes = plan().to_bytes();
    for v in [4u32, 6, 0xffff_ffff] {
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&v.to_le_bytes());
        let e = read(&b).unwrap_err().to_string();
        assert!(
            e.contains(&format!("plan format {v},"))
                && e.contains("reads format 5")
                && e.contains("recompile"),
            "{e}"
        );
    }
    // The text format of mmc before format 4.
    let e = read(b"mmc-plan 3 sha256:00\n{\"settings\": ")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("plan format 3 (the text format of earlier mmc)")
            && e.contains("reads format 5"),
        "{e}"
    );
}

#[test]
fn a_plan_for_another_target_is_refused_naming_both() {
    let f = native_file();
    let path = Path::new(PATH);
    f.check_target(path, &target()).unwrap();
    let host = cpu_target("x86_64", "skylake", "+avx,+avx2,+avx512f");
    let e = f.check_target(path, &host).unwrap_err();
    assert!(matches!(e, PlanError::Target { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(PATH)
            && msg.contains(&target())
            && msg.contains(&host)
            && msg.contains("CPU `znver3`, this one is `skylake`")
            && msg.contains("features this CPU lacks: +fma"),
        "{msg}"
    );
    // Another architecture, and a runtime without native code.
    let e = f
        .check_target(path, "cpu-aarch64 neoverse-v2 +neon")
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("built for x86_64, this machine is aarch64"),
        "{e}"
    );
    let e = f.check_target(path, INTERPRETER_TARGET).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("runs `{INTERPRETER_TARGET}`")),
        "{e}"
    );
    // A plan for the interpreter holds no native code and runs on any host.
    let interp = PlanFile::interpreter(plan());
    interp.check_target(path, &host).unwrap();
    interp.check_target(path, INTERPRETER_TARGET).unwrap();
}

#[test]
fn a_plan_cut_short_anywhere_is_refused_with_the_bytes_missing() {
    for f in [PlanFile::interpreter(plan()), native_file()] {
        let bytes = f.to_bytes();
        let header = header_len(&bytes);
        let body = header
            + RawPlanFile::parse(Path::new(PATH), &bytes)
                .unwrap()
                .sections[0]
                .1
                .len();
        let library_end = body + f.native.as_ref().map_or(0, |l| l.bytes().len());
        for cut in 1..bytes.len() {
            let e = read(&bytes[..cut]).unwrap_err();
            let PlanError::Truncated {
                part,
                missing,
                exact,
                ..
            } = &e
            else {
                panic!("cut at {cut} of {}: {e}", bytes.len())
            };
            let short = (bytes.len() - cut) as u64;
            if cut < header {
                assert!(part.starts_with("header"), "cut at {cut}: {e}");
                assert!(
                    !exact && *missing >= 1 && *missing <= short,
                    "cut at {cut}: {e}"
                );
                assert!(e
                    .to_string()
                    .contains(&format!("at least {missing} bytes are missing")));
            } else {
                let want = if cut < body {
                    "plan body section"
                } else if cut < library_end {
                    "native library section"
                } else {
                    "compiled steps section"
                };
                assert_eq!(part, want, "cut at {cut}");
                assert!(*exact && *missing == short, "cut at {cut}: {e}");
                assert!(
                    e.to_string()
                        .contains(&format!(", {short} bytes are missing")),
                    "{e}"
                );
            }
        }
    }
    // Named points: inside the magic, the version, the target, the section table.
    let bytes = native_file().to_bytes();
    let part = |cut: usize| match read(&bytes[..cut]).unwrap_err() {
        PlanError::Truncated { part, .. } => part,
        e => panic!("{e}"),
    };
    assert_eq!(part(5), "header (magic)");
    assert_eq!(part(10), "header (format version)");
    assert_eq!(part(16), "header (target)");
    let table = 14 + target().len() + 4;
    assert_eq!(part(table + 60), "header (section table)");
    // Once the section count is known, the header's end is: at least that much is missing.
    match read(&bytes[..table + 60]).unwrap_err() {
        PlanError::Truncated { missing, .. } => {
            assert_eq!(missing as usize, header_len(&bytes) - (table + 60))
        }
        e => panic!("{e}"),
    }
    assert_eq!(part(header_len(&bytes) - 1), "header (header digest)");
}

#[test]
fn a_changed_byte_anywhere_is_refused_naming_what_changed() {
    let bytes = native_file().to_bytes();
    let header = header_len(&bytes);
    let steps = native_file().steps.unwrap().len();
    let lib = bytes.len() - steps - library_bytes().len();
    let target_end = 14 + target().len();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let e = read(&b).unwrap_err();
        let what = match &e {
            PlanError::NotAPlan { .. } => "magic",
            PlanError::Version { .. } => "version",
            PlanError::Section { section, .. } => section,
            _ => "other",
        };
        let want = match i {
            0..8 => "magic",
            8..12 => "version",
            // The lengths of the target and the table: the digest or a truncation sees them.
            12..14 => continue,
            i if (target_end..target_end + 4).contains(&i) => continue,
            i if i < header => "header",
            i if i < lib => "plan body",
            i if i < bytes.len() - steps => "native library",
            _ => "compiled steps",
        };
        assert_eq!(what, want, "byte {i}: {e}");
    }
    // The length fields too are caught, whatever the error.
    for i in [12, 13, target_end, target_end + 1, target_end + 3] {
        for flip in [0x01, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            assert!(read(&b).is_err(), "byte {i} ^ {flip:#x}");
        }
    }
    let e = {
        let mut b = bytes.clone();
        b[header + 3] ^= 0x40;
        read(&b).unwrap_err().to_string()
    };
    assert!(
        e.contains("damaged") && e.contains("plan body does not match its SHA-256 checksum"),
        "{e}"
    );
}

#[test]
fn bytes_after_the_last_section_are_refused() {
    for f in [PlanFile::interpreter(plan()), native_file()] {
        for extra in [1usize, 100] {
            let mut b = f.to_bytes();
            b.extend(std::iter::repeat_n(0u8, extra));
            let e = read(&b).unwrap_err();
            assert!(
                matches!(e, PlanError::TrailingBytes { extra: x, .. } if x == extra as u64),
                "{e}"
            );
            assert!(e
                .to_string()
                .contains(&format!("{extra} bytes follow its last section")));
        }
    }
}

#[test]
fn sections_must_fit_the_target_and_each_other() {
    let bytes = native_file().to_bytes();
    let raw = RawPlanFile::parse(Path::new(PATH), &bytes).unwrap();
    let body = raw.section(SectionKind::Body).unwrap();
    let lib = raw.section(SectionKind::NativeLibrary).unwrap();
    let assemble = |target: &str, sections: Vec<(SectionKind, &[u8])>| {
        RawPlanFile {
            target: target.into(),
            sections,
        }
        .to_bytes()
    };
    let refused = |b: Vec<u8>, want: &str| {
        let e = read(&b).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    };
    refused(
        assemble(
            INTERPRETER_TARGET,
            vec![(SectionKind::Body, body), (SectionKind::NativeLibrary, lib)],
        ),
        "an interpreter plan carries a native library",
    );
    refused(
        assemble(&target(), vec![(SectionKind::NativeLibrary, lib)]),
        "no plan body section",
    );
    refused(
        assemble(
            &target(),
            vec![(SectionKind::Body, body), (SectionKind::Body, body)],
        ),
        "two plan body sections",
    );
    // What RawPlanFile assembles from a file's parts is that file.
    assert_eq!(assemble(&raw.target, raw.sections.clone()), bytes);
}
