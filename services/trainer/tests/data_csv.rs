//! The CSV reader and pipeline on small hand-written files: every malformed input gives the
//! documented count or error, never a panic.

use std::collections::BTreeMap;

use synopsis_trainer::data::{
    load_documents, load_documents_from_reader, CleaningConfig, DataError, DataOptions, Dataset,
};

/// Options that keep short test texts (the default minimum is 200 characters).
fn opts() -> DataOptions {
    DataOptions {
        cleaning: CleaningConfig {
            min_chars: 1,
            ..CleaningConfig::default()
        },
        ..DataOptions::default()
    }
}

fn load(bytes: &[u8], opts: &DataOptions) -> Result<Dataset, DataError> {
    load_documents_from_reader(bytes, opts)
}

fn dropped(ds: &Dataset, reason: &str) -> u64 {
    ds.stats.dropped.get(reason).copied().unwrap_or(0)
}

fn assert_counts_add_up(ds: &Dataset) {
    let s = &ds.stats;
    assert_eq!(s.rows_kept + s.dropped_total(), s.rows_read, "{s:?}");
    assert_eq!(s.rows_kept as usize, ds.documents.len());
    assert_eq!(ds.train.len() + ds.eval.len(), ds.documents.len());
}

#[test]
fn bom_crlf_and_quoted_fields_are_read() {
    let csv = "\u{feff}Name,Synopsis\r\n\
               A,\"First, with a comma.\"\r\n\
               B,\"Second\r\nspans lines.\"\r\n\
               C,\"Third says \"\"hi\"\".\"\r\n";
    let ds = load(csv.as_bytes(), &opts()).unwrap();
    assert_eq!(ds.text_column, "Synopsis");
    assert_eq!(
        ds.documents,
        vec![
            "First, with a comma.",
            "Second spans lines.",
            "Third says \"hi\"."
        ]
    );
    assert_eq!(ds.stats.rows_read, 3);
    assert_eq!(ds.stats.modified.get("whitespace_normalized"), Some(&1));
    assert_counts_add_up(&ds);
}

#[test]
fn invalid_utf8_and_ragged_rows_are_counted_and_skipped() {
    let mut csv = b"id,text\n1,Good row.\n2,Bad \xff\xfe bytes.\n3,Too,many,fields\n4\n".to_vec();
    csv.extend_from_slice(b"5,Another good row.\n");
    let ds = load(&csv, &opts()).unwrap();
    assert_eq!(ds.documents, vec!["Good row.", "Another good row."]);
    assert_eq!(ds.stats.rows_read, 5);
    assert_eq!(dropped(&ds, "invalid_utf8"), 1);
    assert_eq!(dropped(&ds, "ragged"), 2);
    assert_counts_add_up(&ds);
}

#[test]
fn invalid_utf8_outside_the_used_columns_does_not_drop_the_row() {
    let ds = load(b"junk,text\n\xff,Fine text.\n", &opts()).unwrap();
    assert_eq!(ds.documents, vec!["Fine text."]);
}

#[test]
fn empty_texts_are_dropped() {
    let ds = load(b"text\n\"\"\n\"   \"\nReal text.\n", &opts()).unwrap();
    assert_eq!(ds.documents, vec!["Real text."]);
    assert_eq!(dropped(&ds, "empty"), 2);
    assert_counts_add_up(&ds);
}

#[test]
fn text_column_detection_and_naming() {
    let csv = b"Title,Description,Plot\nX,From description.,From plot.\n";
    let ds = load(csv, &opts()).unwrap();
    assert_eq!(ds.text_column, "Description");
    let named = DataOptions {
        text_column: Some("plot".into()),
        ..opts()
    };
    let ds = load(csv, &named).unwrap();
    assert_eq!(
        (ds.text_column.as_str(), ds.documents[0].as_str()),
        ("Plot", "From plot.")
    );
}

#[test]
fn missing_columns_are_errors_naming_them() {
    let err = load(b"a,b\n1,2\n", &opts()).unwrap_err();
    match &err {
        DataError::NoTextColumn { columns } => assert_eq!(columns, &["a", "b"]),
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("synopsis"), "{err}");
    let named = DataOptions {
        text_column: Some("story".into()),
        ..opts()
    };
    let err = load(b"a,text\n1,2\n", &named).unwrap_err();
    assert!(matches!(&err, DataError::MissingColumn { column, .. } if column == "story"));
    let cond = DataOptions {
        condition_columns: vec!["Studio".into()],
        ..opts()
    };
    let err = load(b"Name,text\nX,Y\n", &cond).unwrap_err();
    assert!(err.to_string().contains("\"Studio\""), "{err}");
}

#[test]
fn empty_and_header_only_files() {
    assert!(matches!(load(b"", &opts()), Err(DataError::EmptyFile)));
    match load(b"Name,Synopsis\n", &opts()) {
        Err(DataError::NoUsableRows { stats }) => assert_eq!(stats.rows_read, 0),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn no_usable_rows_says_why() {
    let err = load(b"synopsis\nShort.\n\"\"\n", &DataOptions::default()).unwrap_err();
    let DataError::NoUsableRows { stats } = &err else {
        panic!("unexpected {err:?}");
    };
    assert_eq!((stats.rows_read, stats.rows_kept), (2, 0));
    let message = err.to_string();
    assert!(
        message.contains("too_short=1") && message.contains("empty=1"),
        "{message}"
    );
}

#[test]
fn invalid_options_are_refused() {
    let bad_split = DataOptions {
        eval_fraction: 1.0,
        ..opts()
    };
    assert!(matches!(
        load(b"text\nA.\n", &bad_split),
        Err(DataError::InvalidOption(_))
    ));
    let mut bad_lengths = opts();
    bad_lengths.cleaning.min_chars = 10;
    bad_lengths.cleaning.max_chars = 5;
    assert!(matches!(
        load(b"text\nA.\n", &bad_lengths),
        Err(DataError::InvalidOption(_))
    ));
}

#[test]
fn conditioning_renders_each_row_and_the_prompt_matches() {
    let csv = "MAL_ID,Name,Genders,sypnopsis\n\
               1,Cowboy Bebop,\"Action, Sci-Fi\",\"In the year 2071, bounty hunters roam.\"\n\
               2,No Genre,,\"A story without genres.\"\n";
    let cond = DataOptions {
        condition_columns: vec!["Genres".into(), "name".into()],
        ..opts()
    };
    let ds = load(csv.as_bytes(), &cond).unwrap();
    assert_eq!(
        ds.documents[0],
        "Genres: Action, Sci-Fi\nTitle: Cowboy Bebop\nSynopsis: In the year 2071, bounty hunters roam."
    );
    assert_eq!(
        ds.documents[1],
        "Title: No Genre\nSynopsis: A story without genres."
    );
    let template = ds.template.as_ref().unwrap();
    let values = BTreeMap::from([
        ("Genres".to_string(), "Action, Sci-Fi".to_string()),
        ("Title".to_string(), "Cowboy Bebop".to_string()),
    ]);
    let prompt = template.render_prompt(&values, "In the year").unwrap();
    assert!(ds.documents[0].starts_with(&prompt), "{prompt}");
    assert!(load(csv.as_bytes(), &opts()).unwrap().template.is_none());
}

#[test]
fn split_is_seeded_and_deterministic() {
    let mut csv = String::from("text\n");
    for i in 0..200 {
        csv.push_str(&format!("Document number {i}.\n"));
    }
    let a = load(csv.as_bytes(), &opts()).unwrap();
    let b = load(csv.as_bytes(), &opts()).unwrap();
    assert_eq!((a.train.clone(), a.eval.clone()), (b.train, b.eval));
    assert_eq!(a.eval.len(), 10);
    let reseeded = DataOptions { seed: 1, ..opts() };
    assert_ne!(load(csv.as_bytes(), &reseeded).unwrap().eval, a.eval);
    let two = load(b"text\nOne.\nTwo.\n", &opts()).unwrap();
    assert_eq!((two.train.len(), two.eval.len()), (1, 1));
}

#[test]
fn load_documents_reads_a_file_and_reports_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.csv");
    std::fs::write(&path, "text\nFrom a file.\n").unwrap();
    assert_eq!(
        load_documents(&path, &opts()).unwrap().documents,
        vec!["From a file."]
    );
    let missing = load_documents(&dir.path().join("none.csv"), &opts());
    assert!(matches!(missing, Err(DataError::Io { .. })));
}
