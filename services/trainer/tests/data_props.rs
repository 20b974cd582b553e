//! Properties of the reader and cleaner over arbitrary input: nothing panics, and every row
//! read is either kept or counted under exactly one drop reason.

use proptest::prelude::*;
use synopsis_trainer::data::{load_documents_from_reader, CleaningConfig, DataError, DataOptions};

/// Bytes that look like CSV often enough to reach every rule: quotes, separators, line
/// endings, tags, symbols, invalid UTF-8 and ordinary words.
fn csv_like() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop_oneof![
        Just(b",".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b" ".to_vec()),
        Just("\u{feff}".as_bytes().to_vec()),
        Just("\u{a0}\u{200b}☆—".as_bytes().to_vec()),
        Just(b"(Source: ANN)".to_vec()),
        Just(b"No synopsis has been added".to_vec()),
        Just(b"Music video for".to_vec()),
        Just(b"The hero".to_vec()),
        Just(b"story".to_vec()),
        Just(vec![0xff, 0xfe]),
        prop::collection::vec(any::<u8>(), 1..4),
    ];
    prop::collection::vec(pieces, 0..60).prop_map(|v| v.concat())
}

fn check(bytes: &[u8], opts: &DataOptions) -> Result<(), TestCaseError> {
    match load_documents_from_reader(bytes, opts) {
        Ok(ds) => {
            let s = &ds.stats;
            prop_assert_eq!(s.rows_kept + s.dropped_total(), s.rows_read);
            prop_assert_eq!(ds.documents.len() as u64, s.rows_kept);
            prop_assert!(s.rows_kept > 0);
            let mut all: Vec<usize> = ds.train.iter().chain(&ds.eval).copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..ds.documents.len()).collect::<Vec<_>>());
            // Conditioned documents hold header lines; the text rules apply to plain ones.
            for doc in ds.documents.iter().filter(|_| ds.template.is_none()) {
                prop_assert!(!doc.is_empty());
                prop_assert!(doc.chars().count() >= opts.cleaning.min_chars);
                prop_assert!(doc.chars().count() <= opts.cleaning.max_chars);
                let banned = ['\n', '\r', '\u{200b}', '\u{a0}', '☆'];
                prop_assert!(!doc.contains(banned), "{:?}", doc);
            }
        }
        Err(DataError::NoUsableRows { stats }) => {
            prop_assert_eq!(stats.rows_kept, 0);
            prop_assert_eq!(stats.dropped_total(), stats.rows_read);
        }
        Err(DataError::EmptyFile | DataError::NoTextColumn { .. }) => {}
        Err(other) => prop_assert!(false, "unexpected error {other:?}"),
    }
    Ok(())
}

fn short_texts() -> DataOptions {
    DataOptions {
        cleaning: CleaningConfig {
            min_chars: 1,
            ..CleaningConfig::default()
        },
        ..DataOptions::default()
    }
}

/// The kept corpus: every seed file passes the same checks as the generated inputs.
#[test]
fn seed_corpus_accounts_for_every_row() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/csv");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("the seed corpus exists") {
        let path = entry.expect("a directory entry").path();
        let bytes = std::fs::read(&path).expect("a readable seed");
        let plain = check(&bytes, &short_texts());
        assert!(plain.is_ok(), "{}: {plain:?}", path.display());
        let defaults = check(&bytes, &DataOptions::default());
        assert!(defaults.is_ok(), "{}: {defaults:?}", path.display());
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} seed files in {}", dir.display());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&bytes, &short_texts())?;
    }

    #[test]
    fn csv_like_bodies_account_for_every_row(body in csv_like(), with_name in any::<bool>()) {
        let header: &[u8] = if with_name { b"Name,synopsis\n" } else { b"synopsis\n" };
        let bytes = [header, &body].concat();
        check(&bytes, &short_texts())?;
        let conditioned = DataOptions {
            condition_columns: if with_name { vec!["title".into()] } else { vec![] },
            ..short_texts()
        };
        check(&bytes, &conditioned)?;
    }
}
