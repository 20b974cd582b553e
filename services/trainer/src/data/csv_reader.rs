//! RFC 4180 reading that survives real files: byte records (so one bad row is counted, not
//! fatal), flexible field counts (ragged rows are counted and skipped), CRLF or LF, a UTF-8
//! BOM, and the choice of the text column.

use std::io::Read;
use std::path::Path;

use csv::{ByteRecord, ReaderBuilder};

use super::conditioning::ConditioningTemplate;
use super::{DataError, DatasetStats};

/// Header names tried, in this order and case-insensitively, when no text column is named.
/// `sypnopsis` is the raw MyAnimeList file's spelling.
pub const TEXT_COLUMN_CANDIDATES: [&str; 6] = [
    "synopsis",
    "sypnopsis",
    "description",
    "overview",
    "plot",
    "text",
];

/// A first look at a CSV: what an upload reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvSummary {
    /// Data records after the header, whatever their field count or encoding.
    pub rows: u64,
    /// Header names (BOM and surrounding spaces removed; invalid UTF-8 replaced).
    pub columns: Vec<String>,
    /// The column [`load_documents`](super::load_documents) would use when none is named.
    pub detected_text_column: Option<String>,
    /// Whether the header row is valid UTF-8.
    pub header_utf8: bool,
    /// Data records that are not valid UTF-8 (skipped when training).
    pub invalid_utf8_rows: u64,
}

/// Counts the records of the CSV at `path` and detects its text column.
pub fn inspect_csv(path: &Path) -> Result<CsvSummary, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = builder().from_reader(std::io::BufReader::new(file));
    let headers = reader.byte_headers().map_err(csv_error)?;
    let header_utf8 = headers.iter().all(|h| std::str::from_utf8(h).is_ok());
    let columns = header_names(headers);
    let mut record = ByteRecord::new();
    let mut rows = 0u64;
    let mut invalid_utf8_rows = 0u64;
    while reader.read_byte_record(&mut record).map_err(csv_error)? {
        rows += 1;
        if record.iter().any(|f| std::str::from_utf8(f).is_err()) {
            invalid_utf8_rows += 1;
        }
    }
    let detected_text_column = detect_text_column(&columns).map(|i| columns[i].clone());
    Ok(CsvSummary {
        rows,
        columns,
        detected_text_column,
        header_utf8,
        invalid_utf8_rows,
    })
}

/// An open CSV whose text (and condition) columns are resolved; yields one row at a time.
pub(crate) struct Table<R: Read> {
    reader: csv::Reader<R>,
    record: ByteRecord,
    width: usize,
    text_index: usize,
    text_column: String,
    condition_indices: Vec<usize>,
    template: Option<ConditioningTemplate>,
}

impl<R: Read> Table<R> {
    pub(crate) fn open(
        reader: R,
        text_column: Option<&str>,
        condition_columns: &[String],
    ) -> Result<Self, DataError> {
        let mut reader = builder().from_reader(reader);
        let headers = reader.byte_headers().map_err(csv_error)?;
        if headers.is_empty() {
            return Err(DataError::EmptyFile);
        }
        let columns = header_names(headers);
        let text_index = match text_column.map(str::trim).filter(|c| !c.is_empty()) {
            Some(name) => find_column(&columns, name).ok_or_else(|| DataError::MissingColumn {
                column: name.to_string(),
                columns: columns.clone(),
            })?,
            None => detect_text_column(&columns).ok_or_else(|| DataError::NoTextColumn {
                columns: columns.clone(),
            })?,
        };
        let (template, condition_indices) = if condition_columns.is_empty() {
            (None, Vec::new())
        } else {
            let (template, indices) = ConditioningTemplate::resolve(&columns, condition_columns)?;
            (Some(template), indices)
        };
        Ok(Self {
            reader,
            record: ByteRecord::new(),
            width: columns.len(),
            text_column: columns[text_index].clone(),
            text_index,
            condition_indices,
            template,
        })
    }

    pub(crate) fn text_column(&self) -> &str {
        &self.text_column
    }

    pub(crate) fn template(&self) -> Option<&ConditioningTemplate> {
        self.template.as_ref()
    }

    /// The next well-formed row's raw text, with its condition values (whitespace
    /// normalised) in `values`. Ragged and invalid-UTF-8 rows are counted and skipped.
    pub(crate) fn next_row(
        &mut self,
        stats: &mut DatasetStats,
        values: &mut Vec<String>,
    ) -> Result<Option<&str>, DataError> {
        loop {
            if !self
                .reader
                .read_byte_record(&mut self.record)
                .map_err(csv_error)?
            {
                return Ok(None);
            }
            stats.rows_read += 1;
            if self.record.len() != self.width {
                stats.drop_row("ragged");
                continue;
            }
            values.clear();
            let mut valid = true;
            for &i in &self.condition_indices {
                match std::str::from_utf8(&self.record[i]) {
                    Ok(v) => values.push(v.split_whitespace().collect::<Vec<_>>().join(" ")),
                    Err(_) => {
                        valid = false;
                        break;
                    }
                }
            }
            if !valid || std::str::from_utf8(&self.record[self.text_index]).is_err() {
                stats.drop_row("invalid_utf8");
                continue;
            }
            // Validated just above; the second decode keeps the borrow checker simple.
            return Ok(std::str::from_utf8(&self.record[self.text_index]).ok());
        }
    }
}

fn builder() -> ReaderBuilder {
    let mut b = ReaderBuilder::new();
    // `flexible` lets ragged rows through to be counted instead of aborting the file.
    b.has_headers(true).flexible(true);
    b
}

fn header_names(headers: &ByteRecord) -> Vec<String> {
    headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let name = String::from_utf8_lossy(h);
            let name = if i == 0 {
                name.trim_start_matches('\u{feff}')
            } else {
                &name
            };
            name.trim().to_string()
        })
        .collect()
}

/// Index of `name` in `columns`, compared case-insensitively.
pub(crate) fn find_column(columns: &[String], name: &str) -> Option<usize> {
    columns
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name.trim()))
}

fn detect_text_column(columns: &[String]) -> Option<usize> {
    TEXT_COLUMN_CANDIDATES
        .iter()
        .find_map(|candidate| find_column(columns, candidate))
}

fn csv_error(e: csv::Error) -> DataError {
    DataError::Csv(e.to_string())
}
