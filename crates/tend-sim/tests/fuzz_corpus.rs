//! The fuzz corpora as ordinary stable tests: every file of `fuzz/corpus/<target>/` goes
//! through the same check the libFuzzer target runs; valid seeds must decode and
//! round-trip, nothing may panic, and the checked-in corpus matches the generator.

use std::path::PathBuf;

use tend_sim::corpus::{check, generate, Verdict, TARGETS};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn every_corpus_file_decodes_or_is_rejected_without_panic() {
    for target in TARGETS {
        let dir = corpus_dir().join(target);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("readable entry").path())
            .collect();
        entries.sort();
        assert!(
            entries.len() >= 24,
            "{target}: only {} seeds",
            entries.len()
        );
        let mut valid = 0;
        for path in entries {
            let bytes = std::fs::read(&path).expect("readable corpus file");
            let verdict = check(target, &bytes);
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("valid-") {
                assert_eq!(verdict, Verdict::Valid, "{target}/{name} must decode");
                valid += 1;
            }
        }
        assert!(valid >= 5, "{target}: only {valid} valid seeds");
    }
}

#[test]
fn the_checked_in_corpus_is_the_generated_one() {
    for seed in generate() {
        let path = corpus_dir().join(seed.target).join(&seed.name);
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with `cargo run -p tend-sim -- --write-corpus fuzz/corpus`",
                path.display()
            )
        });
        assert_eq!(
            on_disk,
            seed.bytes,
            "{} is stale; regenerate it",
            path.display()
        );
        if seed.valid {
            assert_eq!(check(seed.target, &seed.bytes), Verdict::Valid);
        }
    }
}

#[test]
fn random_bytes_never_panic_a_decoder() {
    // A cheap stand-in for fuzzing on stable: seeded random inputs of every size class.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for target in TARGETS {
        for len in [0usize, 1, 2, 7, 33, 100, 1000] {
            for _ in 0..20 {
                let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                check(target, &bytes);
            }
        }
    }
}
