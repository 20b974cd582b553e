//! Uploaded datasets are stored whole under their sha256, and data paths never leave
//! `--data-root`.

use std::path::Path;

use sha2::{Digest, Sha256};
use synopsis_trainer::data::{resolve_data_path, DataError, DatasetStore};

const CSV: &[u8] = b"MAL_ID,Name,sypnopsis\n1,A,\"First, story.\"\n2,B,Second story.\n";

fn stored_files(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("datasets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn upload_in_chunks_is_stored_under_its_hash() {
    let root = tempfile::tempdir().unwrap();
    let store = DatasetStore::new(root.path()).unwrap();
    let mut upload = store.begin_upload("anime.csv").unwrap();
    for chunk in CSV.chunks(7) {
        upload.write_chunk(chunk).unwrap();
    }
    assert_eq!(upload.bytes(), CSV.len() as u64);
    let info = upload.finish().unwrap();
    assert_eq!(info.dataset_id, hex::encode(Sha256::digest(CSV)));
    assert_eq!((info.bytes, info.rows), (CSV.len() as u64, 2));
    assert_eq!(info.columns, vec!["MAL_ID", "Name", "sypnopsis"]);
    assert_eq!(info.detected_text_column.as_deref(), Some("sypnopsis"));
    let path = store.path_of(&info.dataset_id).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), CSV);
    assert_eq!(
        stored_files(root.path()),
        vec![format!("{}.csv", info.dataset_id)]
    );

    // The same bytes again give the same id and leave one file.
    let mut again = store.begin_upload("copy.csv").unwrap();
    again.write_chunk(CSV).unwrap();
    assert_eq!(again.finish().unwrap().dataset_id, info.dataset_id);
    assert_eq!(stored_files(root.path()).len(), 1);
}

#[test]
fn upload_without_text_column_is_stored_without_detection() {
    let root = tempfile::tempdir().unwrap();
    let store = DatasetStore::new(root.path()).unwrap();
    let mut upload = store.begin_upload("x.csv").unwrap();
    upload.write_chunk(b"a,b\n1,2\n").unwrap();
    let info = upload.finish().unwrap();
    assert_eq!((info.rows, info.detected_text_column), (1, None));
}

#[test]
fn oversized_empty_and_abandoned_uploads_store_nothing() {
    let root = tempfile::tempdir().unwrap();
    let store = DatasetStore::new(root.path()).unwrap().with_max_bytes(10);
    let mut upload = store.begin_upload("big.csv").unwrap();
    upload.write_chunk(b"text\nabc\n").unwrap();
    let err = upload.write_chunk(b"more").unwrap_err();
    assert!(matches!(err, DataError::UploadTooLarge { limit: 10 }));
    drop(upload);
    let empty = store.begin_upload("empty.csv").unwrap();
    assert!(matches!(empty.finish(), Err(DataError::EmptyUpload)));
    assert!(
        stored_files(root.path()).is_empty(),
        "temporary files left behind"
    );
}

#[test]
fn dataset_ids_are_validated() {
    let root = tempfile::tempdir().unwrap();
    let store = DatasetStore::new(root.path()).unwrap();
    for bad in [
        "",
        "abc",
        "../../etc/passwd",
        &"A".repeat(64),
        &"g".repeat(64),
    ] {
        assert!(
            matches!(store.path_of(bad), Err(DataError::InvalidDatasetId(_))),
            "{bad}"
        );
    }
    let unknown = "0".repeat(64);
    assert!(matches!(
        store.path_of(&unknown),
        Err(DataError::UnknownDataset(_))
    ));
}

#[test]
fn data_paths_stay_under_the_root() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.csv"), "text\nsecret\n").unwrap();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(data.join("anime")).unwrap();
    std::fs::write(data.join("anime/a.csv"), "text\nA.\n").unwrap();
    std::fs::write(root.path().join("sibling.csv"), "text\nB.\n").unwrap();

    let ok = resolve_data_path(&data, "anime/a.csv").unwrap();
    assert_eq!(ok, data.join("anime/a.csv").canonicalize().unwrap());
    assert_eq!(resolve_data_path(&data, "./anime/a.csv").unwrap(), ok);

    let refused = |rel: &str| {
        matches!(
            resolve_data_path(&data, rel),
            Err(DataError::PathRefused { .. })
        )
    };
    assert!(refused("../sibling.csv"));
    assert!(refused("anime/../../sibling.csv"));
    assert!(
        refused("anime/../a.csv"),
        "\"..\" is refused even when it stays inside"
    );
    let absolute = outside.path().join("secret.csv");
    assert!(refused(absolute.to_str().unwrap()));
    assert!(refused("anime/a.csv\0"));
    assert!(refused(""));

    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(outside.path().join("secret.csv"), data.join("out.csv"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), data.join("outdir")).unwrap();
        std::os::unix::fs::symlink(data.join("anime/a.csv"), data.join("in.csv")).unwrap();
        assert!(refused("out.csv"));
        assert!(refused("outdir/secret.csv"));
        assert_eq!(resolve_data_path(&data, "in.csv").unwrap(), ok);
    }

    assert!(matches!(
        resolve_data_path(&data, "anime/none.csv"),
        Err(DataError::PathNotFound(_))
    ));
    assert!(matches!(
        resolve_data_path(&data, "anime"),
        Err(DataError::PathNotFound(_))
    ));
}

fn upload(store: &DatasetStore, data: &[u8]) -> Result<String, DataError> {
    let mut upload = store.begin_upload("x.csv")?;
    upload.write_chunk(data)?;
    upload.finish().map(|info| info.dataset_id)
}

/// An upload is kept only if it is a CSV: random bytes, a header alone, a header of nothing
/// are refused when the upload ends, and nothing is stored.
#[test]
fn uploads_that_are_not_csv_are_refused_and_not_kept() {
    let root = tempfile::tempdir().unwrap();
    let store = DatasetStore::new(root.path()).unwrap();
    let mut random = vec![0u8; 256 * 1024];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for byte in random.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = (state >> 24) as u8;
    }
    for (what, data) in [
        ("random bytes", random.as_slice()),
        ("a header alone", b"id,Synopsis\n".as_slice()),
        ("an empty header", b"\n\n1\n".as_slice()),
        (
            "mostly not UTF-8",
            b"Synopsis\n\xff\xfe\n\xc3\x28\nok\n".as_slice(),
        ),
    ] {
        let err = upload(&store, data).unwrap_err();
        assert!(matches!(err, DataError::NotCsv(_)), "{what}: {err}");
    }
    assert!(
        stored_files(root.path()).is_empty(),
        "{:?}",
        stored_files(root.path())
    );
    // A stray bad row is counted and skipped later, not a reason to refuse the file.
    upload(&store, b"Synopsis\nfine\n\xff\nalso fine\n").unwrap();
}

/// The stored datasets share a quota; an upload over it is refused and not kept.
#[test]
fn uploads_over_the_quota_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let store = DatasetStore::new(root.path())
        .unwrap()
        .with_quota(Some(CSV.len() as u64 + 10));
    upload(&store, CSV).unwrap();
    let err = upload(&store, b"Synopsis\nanother story\n").unwrap_err();
    assert!(matches!(err, DataError::QuotaExceeded { .. }), "{err}");
    assert_eq!(stored_files(root.path()).len(), 1);
}

/// Old datasets no run uses are removed; used or recent ones stay.
#[test]
fn unused_datasets_past_their_retention_are_removed() {
    let root = tempfile::tempdir().unwrap();
    let store = DatasetStore::new(root.path()).unwrap();
    let used = upload(&store, CSV).unwrap();
    let unused = upload(&store, b"Synopsis\nanother story\n").unwrap();
    let kept = store.remove_unused(std::time::Duration::from_secs(3600), |_| false);
    assert!(kept.is_empty(), "recent datasets are kept: {kept:?}");
    let removed = store.remove_unused(std::time::Duration::ZERO, |id| id == used);
    assert_eq!(removed, vec![unused]);
    assert_eq!(stored_files(root.path()), vec![format!("{used}.csv")]);
}
