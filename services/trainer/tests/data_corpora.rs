//! The pipeline on the project's real corpora (read from the shared data directory, never
//! copied into the repository): its counts must match what is known of each file.
//!
//! The directory is `$SYNOPSIS_DATA_DIR`, or `../shared/data` beside the repository. When it
//! is absent these tests fail: they are part of what `make test` proves.

use std::path::{Path, PathBuf};

use synopsis_trainer::data::{load_documents, CleaningConfig, DataOptions, Dataset};

fn data_file(rel: &str) -> Option<PathBuf> {
    // Always `Some`: a missing file fails the test instead of skipping it.
    let dir = std::env::var_os("SYNOPSIS_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let path = dir.join(rel);
    assert!(
        path.is_file(),
        "{} not found (set SYNOPSIS_DATA_DIR)",
        path.display()
    );
    Some(path)
}

fn dropped(ds: &Dataset, reason: &str) -> u64 {
    ds.stats.dropped.get(reason).copied().unwrap_or(0)
}

fn check_invariants(ds: &Dataset) {
    let s = &ds.stats;
    assert_eq!(s.rows_kept + s.dropped_total(), s.rows_read, "{s:?}");
    assert_eq!(ds.documents.len() as u64, s.rows_kept);
    assert_eq!(ds.train.len() + ds.eval.len(), ds.documents.len());
    let expected_eval = (ds.documents.len() as f64 * 0.05).round() as usize;
    assert_eq!(ds.eval.len(), expected_eval);
}

/// No rows are read twice or lost: the 16,214 rows of the raw MyAnimeList file.
#[test]
fn raw_anime_file_with_defaults() {
    let Some(path) = data_file("anime/anime_with_synopsis.csv") else {
        return;
    };
    let ds = load_documents(&path, &DataOptions::default()).unwrap();
    check_invariants(&ds);
    assert_eq!(ds.text_column, "sypnopsis");
    assert_eq!(ds.stats.rows_read, 16_214);
    assert_eq!(dropped(&ds, "empty"), 8);
    assert_eq!(dropped(&ds, "placeholder"), 745);
    // ~5,300 synopses lost their first characters; some of them are meta notes first.
    assert!(
        (4_900..=5_303).contains(&dropped(&ds, "truncated_start")),
        "{:?}",
        ds.stats
    );
    assert!(
        (400..=700).contains(&dropped(&ds, "meta_note")),
        "{:?}",
        ds.stats
    );
    assert!(
        (40..=45).contains(&dropped(&ds, "duplicate")),
        "{:?}",
        ds.stats
    );
    // ~5,400 end with a source tag; of the kept rows, a majority did.
    let tagged = ds
        .stats
        .modified
        .get("source_tag_stripped")
        .copied()
        .unwrap_or(0);
    assert!(tagged > ds.stats.rows_kept / 2, "{:?}", ds.stats);
    // The recommended corpus (6,419 rows) less its ~35 meta notes and its 744 rows over
    // the 1,000-character default.
    assert!(
        (5_550..=5_700).contains(&ds.stats.rows_kept),
        "{:?}",
        ds.stats
    );
    for doc in &ds.documents {
        let first = doc.chars().next().unwrap_or(' ');
        assert!(!first.is_lowercase(), "{doc}");
        // A tag followed by more text (an editor's note) stays; none ends a document.
        if let Some(at) = doc.rfind("(Source") {
            assert!(doc[at..].contains(") "), "{doc}");
        }
        let n = doc.chars().count();
        assert!((200..=1_000).contains(&n), "{n}: {doc}");
    }
}

/// With the meta-note rule off and no upper length, the raw file gives exactly the
/// recommended cleaned corpus: the same rules, applied in the same order.
#[test]
fn raw_anime_file_reproduces_the_recommended_corpus() {
    let (Some(raw), Some(clean)) = (
        data_file("anime/anime_with_synopsis.csv"),
        data_file("anime/anime_synopses_clean.csv"),
    ) else {
        return;
    };
    let opts = DataOptions {
        cleaning: CleaningConfig {
            max_chars: 10_000,
            drop_meta_notes: false,
            ..CleaningConfig::default()
        },
        ..DataOptions::default()
    };
    let from_raw = load_documents(&raw, &opts).unwrap();
    check_invariants(&from_raw);
    assert_eq!(from_raw.stats.rows_kept, 6_419, "{:?}", from_raw.stats);
    assert_eq!(dropped(&from_raw, "truncated_start"), 5_303);
    assert_eq!(dropped(&from_raw, "duplicate"), 43);
    let from_clean = load_documents(&clean, &opts).unwrap();
    assert_eq!(from_clean.stats.rows_kept, 6_419, "{:?}", from_clean.stats);
    let same = from_raw
        .documents
        .iter()
        .zip(&from_clean.documents)
        .filter(|(a, b)| a == b)
        .count();
    // The cleaned file kept the symbols this pipeline removes from a few dozen rows.
    assert!(same >= 6_350, "{same} identical documents");
}

#[test]
fn clean_anime_file_is_nearly_all_kept() {
    let Some(path) = data_file("anime/anime_synopses_clean.csv") else {
        return;
    };
    let opts = DataOptions {
        cleaning: CleaningConfig {
            max_chars: 10_000,
            ..CleaningConfig::default()
        },
        ..DataOptions::default()
    };
    let ds = load_documents(&path, &opts).unwrap();
    check_invariants(&ds);
    assert_eq!(ds.text_column, "Synopsis");
    assert_eq!(ds.stats.rows_read, 6_419);
    // Only meta notes ("Official music video for …") go.
    assert_eq!(ds.stats.dropped_total(), dropped(&ds, "meta_note"));
    assert!(
        (20..=50).contains(&dropped(&ds, "meta_note")),
        "{:?}",
        ds.stats
    );

    // With the defaults, the 1,000-character limit also applies.
    let ds = load_documents(&path, &DataOptions::default()).unwrap();
    check_invariants(&ds);
    assert_eq!(dropped(&ds, "too_long"), 744);
}

#[test]
fn conditioned_anime_documents_use_the_raw_genre_column() {
    let Some(path) = data_file("anime/anime_with_synopsis.csv") else {
        return;
    };
    let opts = DataOptions {
        condition_columns: vec!["Genres".into(), "Name".into()],
        ..DataOptions::default()
    };
    let ds = load_documents(&path, &opts).unwrap();
    let template = ds.template.as_ref().unwrap();
    assert_eq!(template.columns, vec!["Genders", "Name"]);
    assert_eq!(template.labels, vec!["Genres", "Title"]);
    let with_header = ds
        .documents
        .iter()
        .filter(|d| {
            d.starts_with("Genres: ") && d.contains("\nTitle: ") && d.contains("\nSynopsis: ")
        })
        .count();
    assert!(with_header as u64 >= ds.stats.rows_kept * 99 / 100);
}

#[test]
fn netflix_descriptions_with_crlf() {
    let Some(path) = data_file("heldout/netflix_titles.csv") else {
        return;
    };
    // Netflix descriptions are 61–248 characters: the anime minimum of 200 keeps few.
    let defaults = load_documents(&path, &DataOptions::default()).unwrap();
    assert_eq!(defaults.stats.rows_read, 8_807);
    assert!(
        dropped(&defaults, "too_short") > 8_000,
        "{:?}",
        defaults.stats
    );

    let opts = DataOptions {
        cleaning: CleaningConfig {
            min_chars: 50,
            ..CleaningConfig::default()
        },
        ..DataOptions::default()
    };
    let ds = load_documents(&path, &opts).unwrap();
    check_invariants(&ds);
    assert_eq!(ds.text_column, "description");
    assert_eq!(ds.stats.rows_read, 8_807);
    assert!(ds.stats.rows_kept >= 8_700, "{:?}", ds.stats);
    assert!(ds
        .documents
        .iter()
        .all(|d| !d.contains('\r') && !d.contains('\n')));
}
