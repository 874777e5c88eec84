//! The fuzz targets as property tests: every input kept in `fuzz/regressions/TARGET/` (each
//! once made a target crash, hang or allocate too much; see fuzz/README.md), every seed in
//! `fuzz/corpus/TARGET/`, and random mutations of those seeds (bytes flipped, inserted and
//! cut), with the same allocation limits as the AFL harnesses. `PROPTEST_CASES` sets how
//! many mutations per target (default 200).

use proptest::prelude::*;
use std::path::PathBuf;

#[global_allocator]
static ALLOC: qnbd_fuzz::LimitAlloc = qnbd_fuzz::LimitAlloc;

fn files(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(&p).ok().map(|d| (p, d)))
        .collect();
    out.sort();
    out
}

fn target(name: &str) -> fn(&[u8]) {
    qnbd_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("a known target")
}

/// Run one input; over a second is a hang (AFL's limit is 1 s; allow slow CI).
fn run(name: &str, what: &str, data: &[u8]) {
    let t = std::time::Instant::now();
    target(name)(data);
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "{name}: {what} took {took:?}"
    );
}

fn kept(name: &str) {
    for kind in ["regressions", "corpus"] {
        for (p, d) in files(kind, name) {
            run(name, &p.display().to_string(), &d);
        }
    }
}

/// A mutation of one seed: up to 16 edits, each an overwrite, an insertion, a cut or a
/// 32-bit value of interest (0, -1, 2^31, 2^32-1 ... as AFL uses) at a position.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Cut(usize, usize),
    Word(usize, u32),
    Truncate(usize),
}

/// A position anywhere in the input, or (as often) in its first 4 KiB: where headers are,
/// which a uniform choice over an image of a MiB would seldom touch.
fn pos() -> impl Strategy<Value = usize> {
    prop_oneof![any::<usize>(), 0usize..4096]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (pos(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        1 => (pos(), proptest::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(p, v)| Edit::Insert(p, v)),
        1 => (pos(), 1usize..64).prop_map(|(p, n)| Edit::Cut(p, n)),
        2 => (
            pos(),
            prop_oneof![
                Just(0u32),
                Just(u32::MAX),
                Just(0x8000_0000),
                Just(0x7fff_ffff),
                Just(0x0200_0000),
                Just(0x0200_0001),
                Just(4096),
                any::<u32>()
            ]
        )
            .prop_map(|(p, w)| Edit::Word(p, w)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut d: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = d.len().max(1);
        match e {
            Edit::Set(p, b) => {
                if !d.is_empty() {
                    d[p % n] = *b;
                }
            }
            Edit::Insert(p, v) => {
                let at = p % (d.len() + 1);
                d.splice(at..at, v.iter().copied());
            }
            Edit::Cut(p, k) => {
                if !d.is_empty() {
                    let at = p % n;
                    let end = (at + k).min(d.len());
                    d.drain(at..end);
                }
            }
            Edit::Word(p, w) => {
                if d.len() >= 4 {
                    let at = p % (d.len() - 3);
                    d[at..at + 4].copy_from_slice(&w.to_be_bytes());
                }
            }
            Edit::Truncate(p) => d.truncate(p % n),
        }
    }
    d
}

fn mutate(name: &str) {
    let seeds = files("corpus", name);
    assert!(!seeds.is_empty(), "fuzz/corpus/{name} has no seeds");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec(edit(), 0..16),
        any::<u8>(),
    );
    let result = runner.run(&strategy, |(i, edits, mode)| {
        let mut d = apply(seeds[i].1.clone(), &edits);
        // Now and then another mode byte, so every mode sees every seed's shape.
        if mode < 32 && !d.is_empty() {
            d[0] = mode;
        }
        run(name, "a mutated seed", &d);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

macro_rules! target_tests {
    ($($name:ident),*) => {
        mod kept {
            $(#[test] fn $name() { super::kept(stringify!($name)); })*
        }
        mod mutated {
            $(#[test] fn $name() { super::mutate(stringify!($name)); })*
        }
    };
}

target_tests!(handshake, transmission, parsers, qcow2, client, formats);
