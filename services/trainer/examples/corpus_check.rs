//! The cleaning pipeline on the full corpora the project started from, checked against what is
//! known of each file (row counts, defects, the recommended cleaned corpus). The corpora are not
//! in the repository; the tests run the same rules on excerpts (`tests/data_corpora.rs`).
//!
//! `cargo run -p synopsis-trainer --example corpus_check -- DATA_ROOT`, where `DATA_ROOT` holds
//! `anime/anime_with_synopsis.csv`, `anime/anime_synopses_clean.csv` and
//! `heldout/netflix_titles.csv` (`SYNOPSIS_DATA_ROOT` also names it). A failed check panics
//! (non-zero exit); a missing file is an error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use synopsis_trainer::data::{load_documents, CleaningConfig, DataOptions, Dataset};

const FILES: [&str; 3] = [
    "anime/anime_with_synopsis.csv",
    "anime/anime_synopses_clean.csv",
    "heldout/netflix_titles.csv",
];

type Check = fn(&Path);

fn main() -> ExitCode {
    let Some(root) = std::env::args_os()
        .nth(1)
        .or_else(|| std::env::var_os("SYNOPSIS_DATA_ROOT"))
        .map(PathBuf::from)
    else {
        eprintln!(
            "usage: corpus_check DATA_ROOT (or set SYNOPSIS_DATA_ROOT): the folder holding {}",
            FILES.join(", ")
        );
        return ExitCode::from(2);
    };
    let missing: Vec<_> = FILES.iter().filter(|f| !root.join(f).is_file()).collect();
    if !missing.is_empty() {
        eprintln!("corpus_check: {} lacks {missing:?}", root.display());
        return ExitCode::from(2);
    }
    let checks: [(&str, Check); 5] = [
        ("raw_anime_file_with_defaults", raw_anime_file_with_defaults),
        (
            "raw_anime_file_reproduces_the_recommended_corpus",
            raw_anime_file_reproduces_the_recommended_corpus,
        ),
        (
            "clean_anime_file_is_nearly_all_kept",
            clean_anime_file_is_nearly_all_kept,
        ),
        (
            "conditioned_anime_documents_use_the_raw_genre_column",
            conditioned_anime_documents_use_the_raw_genre_column,
        ),
        (
            "netflix_descriptions_with_crlf",
            netflix_descriptions_with_crlf,
        ),
    ];
    for (name, check) in checks {
        check(&root);
        println!("ok  {name}");
    }
    ExitCode::SUCCESS
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
fn raw_anime_file_with_defaults(root: &Path) {
    let path = root.join("anime/anime_with_synopsis.csv");
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
fn raw_anime_file_reproduces_the_recommended_corpus(root: &Path) {
    let raw = root.join("anime/anime_with_synopsis.csv");
    let clean = root.join("anime/anime_synopses_clean.csv");
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

fn clean_anime_file_is_nearly_all_kept(root: &Path) {
    let path = root.join("anime/anime_synopses_clean.csv");
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

fn conditioned_anime_documents_use_the_raw_genre_column(root: &Path) {
    let path = root.join("anime/anime_with_synopsis.csv");
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

fn netflix_descriptions_with_crlf(root: &Path) {
    let path = root.join("heldout/netflix_titles.csv");
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
