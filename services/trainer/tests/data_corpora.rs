//! The pipeline on excerpts shaped like the corpora the project started from (written for these
//! tests from the project's own corpus, in `corpus/excerpts/`): the raw MyAnimeList layout with
//! its misspelt `sypnopsis` column, source tags, placeholders, notes that are not synopses and
//! cut-off starts, and Netflix's CRLF file with a `description` column. Each row's fate is
//! known from how the excerpt was written, so the counts are exact. The same checks on the
//! full corpora: `cargo run -p synopsis-trainer --example corpus_check -- DATA_ROOT`.

use std::path::{Path, PathBuf};

use synopsis_trainer::data::{load_documents, CleaningConfig, DataOptions, Dataset};

fn excerpt(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/excerpts")
        .join(name)
}

fn dropped(ds: &Dataset, reason: &str) -> u64 {
    ds.stats.dropped.get(reason).copied().unwrap_or(0)
}

fn modified(ds: &Dataset, rule: &str) -> u64 {
    ds.stats.modified.get(rule).copied().unwrap_or(0)
}

fn check_invariants(ds: &Dataset) {
    let s = &ds.stats;
    assert_eq!(s.rows_kept + s.dropped_total(), s.rows_read, "{s:?}");
    assert_eq!(ds.documents.len() as u64, s.rows_kept);
    assert_eq!(ds.train.len() + ds.eval.len(), ds.documents.len());
}

/// Rows 1–8 and 22 of the excerpt are synopses; the other 13 each carry one defect.
#[test]
fn raw_anime_excerpt_with_defaults() {
    let ds = load_documents(&excerpt("mal_raw.csv"), &DataOptions::default()).unwrap();
    check_invariants(&ds);
    assert_eq!(ds.text_column, "sypnopsis");
    assert_eq!(ds.stats.rows_read, 22);
    assert_eq!(ds.stats.rows_kept, 9, "{}", ds.stats.summary());
    for (reason, n) in [
        ("empty", 2),           // rows 9–10: nothing, and only spaces
        ("placeholder", 2),     // rows 11–12: "No synopsis … has been added"
        ("truncated_start", 3), // rows 13–15: "ssai is …", "he clockwork …", ".D. 2087"
        ("meta_note", 3), // rows 16–18: "Short film by", "adaptation of the novel", "Recap of"
        ("too_short", 1), // row 19: 72 characters
        ("too_long", 1),  // row 20: 1,312 characters
        ("duplicate", 1), // row 21: row 1 again once its tag is stripped
    ] {
        assert_eq!(dropped(&ds, reason), n, "{reason}: {}", ds.stats.summary());
    }
    // Rows 5–7 end in tags (one doubled); row 6 has two spaces before its tag, row 8 a
    // non-breaking space; row 22 a decoration and a star between two words.
    assert_eq!(modified(&ds, "source_tag_stripped"), 3);
    assert_eq!(modified(&ds, "nbsp_replaced"), 1);
    assert_eq!(modified(&ds, "whitespace_normalized"), 2);
    assert_eq!(modified(&ds, "symbols_removed"), 1);
    for doc in &ds.documents {
        assert!(
            !doc.contains("(Source") && !doc.contains("[Written"),
            "{doc}"
        );
        assert!(
            !doc.contains('\u{2606}') && !doc.contains('\u{a0}'),
            "{doc}"
        );
        assert!(!doc.contains("  ") && doc.trim() == doc, "{doc:?}");
        let n = doc.chars().count();
        assert!((200..=1_000).contains(&n), "{n}: {doc}");
    }
}

/// The raw excerpt, cleaned, is exactly the cleaned excerpt (written by hand as the expected
/// output): same texts, same order, and the cleaned file loses nothing more.
#[test]
fn raw_anime_excerpt_gives_the_cleaned_excerpt() {
    let from_raw = load_documents(&excerpt("mal_raw.csv"), &DataOptions::default()).unwrap();
    let clean = load_documents(&excerpt("mal_clean.csv"), &DataOptions::default()).unwrap();
    check_invariants(&clean);
    assert_eq!(clean.text_column, "Synopsis");
    assert_eq!(clean.stats.rows_read, 9);
    assert_eq!(clean.stats.dropped_total(), 0, "{}", clean.stats.summary());
    assert!(
        clean.stats.modified.is_empty(),
        "{:?}",
        clean.stats.modified
    );
    assert_eq!(from_raw.documents, clean.documents);
}

/// Turning a rule off keeps what it would drop: with no meta-note rule and no upper length,
/// the three notes and the over-long row stay.
#[test]
fn raw_anime_excerpt_with_rules_off() {
    let opts = DataOptions {
        cleaning: CleaningConfig {
            max_chars: 10_000,
            drop_meta_notes: false,
            ..CleaningConfig::default()
        },
        ..DataOptions::default()
    };
    let ds = load_documents(&excerpt("mal_raw.csv"), &opts).unwrap();
    check_invariants(&ds);
    // Rows 16, 17 and 20 are kept; row 18 ("Recap of the first season.") is then too short.
    assert_eq!(ds.stats.rows_kept, 12, "{}", ds.stats.summary());
    assert_eq!(dropped(&ds, "meta_note"), 0);
    assert_eq!(dropped(&ds, "too_short"), 2);
    assert_eq!(dropped(&ds, "too_long"), 0);
    assert!(ds.documents.iter().any(|d| d.starts_with("Short film by")));
}

#[test]
fn conditioned_anime_documents_use_the_misspelt_genre_column() {
    let opts = DataOptions {
        condition_columns: vec!["Genres".into(), "Name".into()],
        ..DataOptions::default()
    };
    let ds = load_documents(&excerpt("mal_raw.csv"), &opts).unwrap();
    let template = ds.template.as_ref().unwrap();
    assert_eq!(template.columns, vec!["Genders", "Name"]);
    assert_eq!(template.labels, vec!["Genres", "Title"]);
    assert_eq!(ds.documents.len(), 9);
    let first = &ds.documents[0];
    assert!(
        first.starts_with(
            "Genres: Action, Sci-Fi, Space, Comedy\nTitle: Starlane Couriers Ardent\nSynopsis: In the year 2199,"
        ),
        "{first}"
    );
    for doc in &ds.documents {
        assert!(
            doc.starts_with("Genres: ")
                && doc.contains("\nTitle: ")
                && doc.contains("\nSynopsis: "),
            "{doc}"
        );
    }
}

/// Netflix's layout: CRLF line endings and short `description`s (105–241 characters here).
#[test]
fn netflix_excerpt_with_crlf() {
    let path = excerpt("netflix_crlf.csv");
    assert!(std::fs::read(&path)
        .unwrap()
        .windows(2)
        .any(|w| w == b"\r\n"));
    // The anime minimum of 200 characters keeps only the two longer descriptions.
    let defaults = load_documents(&path, &DataOptions::default()).unwrap();
    check_invariants(&defaults);
    assert_eq!(defaults.text_column, "description");
    assert_eq!(defaults.stats.rows_read, 12);
    assert_eq!(defaults.stats.rows_kept, 2);
    assert_eq!(dropped(&defaults, "too_short"), 10);

    let opts = DataOptions {
        cleaning: CleaningConfig {
            min_chars: 50,
            ..CleaningConfig::default()
        },
        ..DataOptions::default()
    };
    let ds = load_documents(&path, &opts).unwrap();
    check_invariants(&ds);
    assert_eq!(ds.stats.rows_kept, 12, "{}", ds.stats.summary());
    assert!(ds
        .documents
        .iter()
        .all(|d| !d.contains('\r') && !d.contains('\n')));
}
