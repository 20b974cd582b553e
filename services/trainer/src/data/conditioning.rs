//! Conditioning: other columns of a row (genres, title) become a header before the synopsis,
//! so a model trained on it can be steered at generation time with the same header.
//!
//! The format, exactly (one line per condition column, in the requested order):
//!
//! ```text
//! Genres: Action, Mecha
//! Title: Cowboy Bebop
//! Synopsis: In the year 2071, …
//! ```
//!
//! - The label of a column is "Title" for `Name`/`title`, "Genres" for `Genres`/`Genders`
//!   (the raw MyAnimeList spelling)/`listed_in` (Netflix), otherwise the header's name.
//! - Values have their whitespace collapsed to single spaces (no value spans lines).
//! - A line whose value is empty is omitted, in training documents and in prompts alike,
//!   so a prompt without a title looks like a training row without one.
//! - The last line is always `Synopsis: ` and the text, whatever the text column is called.
//!   A prompt with no text ends in `Synopsis:` without the space: GPT-2's tokenizer attaches
//!   the space to the next word, as it did in training.
//!
//! The template is serialised (JSON) into each checkpoint; the generator rebuilds prompts with
//! [`ConditioningTemplate::render_prompt`]. The end-of-text token is the tokenizer's business.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::csv_reader::find_column;
use super::DataError;

/// Label of the text line that ends every conditioned document.
pub const SYNOPSIS_LABEL: &str = "Synopsis";

/// Header names that mean the same thing in the corpora this product reads.
const ALIASES: [(&[&str], &str); 2] = [
    (&["name", "title"], "Title"),
    (&["genres", "genders", "genre", "listed_in"], "Genres"),
];

/// The condition columns (as named in the training file's header) and their labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditioningTemplate {
    pub columns: Vec<String>,
    pub labels: Vec<String>,
}

impl ConditioningTemplate {
    /// Finds each requested column in `header` (case-insensitively, then through the
    /// aliases), returning the template and the columns' indices.
    pub(crate) fn resolve(
        header: &[String],
        requested: &[String],
    ) -> Result<(Self, Vec<usize>), DataError> {
        let mut columns = Vec::with_capacity(requested.len());
        let mut labels = Vec::with_capacity(requested.len());
        let mut indices: Vec<usize> = Vec::with_capacity(requested.len());
        for name in requested {
            let index = find_column(header, name)
                .or_else(|| {
                    alias_group(name)
                        .and_then(|(names, _)| names.iter().find_map(|a| find_column(header, a)))
                })
                .ok_or_else(|| DataError::MissingColumn {
                    column: name.clone(),
                    columns: header.to_vec(),
                })?;
            if indices.contains(&index) {
                return Err(DataError::InvalidOption(format!(
                    "condition column {} repeats column {}",
                    synopsis_common::quote(name),
                    synopsis_common::quote(&header[index])
                )));
            }
            let column = header[index].clone();
            labels.push(label_of(&column));
            columns.push(column);
            indices.push(index);
        }
        Ok((Self { columns, labels }, indices))
    }

    /// A training document: the header lines for `values` (in `columns` order), then the text.
    pub fn render_document<S: AsRef<str>>(&self, values: &[S], synopsis: &str) -> String {
        let mut out = String::with_capacity(synopsis.len() + 64);
        for (label, value) in self.labels.iter().zip(values) {
            push_line(&mut out, label, value.as_ref());
        }
        out.push_str(SYNOPSIS_LABEL);
        out.push_str(": ");
        out.push_str(synopsis);
        out
    }

    /// A generation prompt: `values` keyed by label or column name (case-insensitive, aliases
    /// accepted, e.g. "title" or "Name"), then `prompt` as the synopsis's opening.
    /// Unknown keys are an error naming the key; missing or empty ones are omitted.
    pub fn render_prompt(
        &self,
        values: &BTreeMap<String, String>,
        prompt: &str,
    ) -> Result<String, DataError> {
        let mut by_position: Vec<Option<&str>> = vec![None; self.labels.len()];
        for (key, value) in values {
            let position = self
                .position_of(key)
                .ok_or_else(|| DataError::UnknownConditionKey {
                    key: key.clone(),
                    known: self.labels.clone(),
                })?;
            by_position[position] = Some(value);
        }
        let mut out = String::new();
        for (label, value) in self.labels.iter().zip(by_position) {
            push_line(&mut out, label, value.unwrap_or(""));
        }
        out.push_str(SYNOPSIS_LABEL);
        out.push(':');
        let prompt = prompt.trim_start();
        if !prompt.is_empty() {
            out.push(' ');
            out.push_str(prompt);
        }
        Ok(out)
    }

    fn position_of(&self, key: &str) -> Option<usize> {
        let key = key.trim();
        let direct = self
            .labels
            .iter()
            .zip(&self.columns)
            .position(|(l, c)| l.eq_ignore_ascii_case(key) || c.eq_ignore_ascii_case(key));
        direct.or_else(|| {
            let (_, label) = alias_group(key)?;
            self.labels.iter().position(|l| l == label)
        })
    }
}

fn push_line(out: &mut String, label: &str, value: &str) {
    let mut words = value.split_whitespace();
    let Some(first) = words.next() else {
        return;
    };
    out.push_str(label);
    out.push_str(": ");
    out.push_str(first);
    for word in words {
        out.push(' ');
        out.push_str(word);
    }
    out.push('\n');
}

fn alias_group(name: &str) -> Option<(&'static [&'static str], &'static str)> {
    let name = name.trim();
    ALIASES
        .iter()
        .find(|(names, _)| names.iter().any(|a| a.eq_ignore_ascii_case(name)))
        .copied()
}

fn label_of(column: &str) -> String {
    alias_group(column).map_or_else(|| column.to_string(), |(_, label)| label.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<String> {
        ["MAL_ID", "Name", "Score", "Genders", "sypnopsis"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn resolves_aliases_and_renders_the_documented_format() {
        let requested = ["Genres".to_string(), "title".to_string()];
        let (t, idx) = ConditioningTemplate::resolve(&header(), &requested).unwrap();
        assert_eq!(idx, vec![3, 1]);
        assert_eq!(t.columns, vec!["Genders", "Name"]);
        assert_eq!(t.labels, vec!["Genres", "Title"]);
        let doc = t.render_document(&["Action, Mecha", " Cowboy\tBebop "], "In 2071.");
        assert_eq!(
            doc,
            "Genres: Action, Mecha\nTitle: Cowboy Bebop\nSynopsis: In 2071."
        );
        assert_eq!(
            t.render_document(&["", "X"], "Y."),
            "Title: X\nSynopsis: Y."
        );
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            serde_json::from_str::<ConditioningTemplate>(&json).unwrap(),
            t
        );
    }

    #[test]
    fn prompts_match_training_documents() {
        let requested = ["Genres".to_string(), "Name".to_string()];
        let (t, _) = ConditioningTemplate::resolve(&header(), &requested).unwrap();
        let mut values = BTreeMap::new();
        values.insert("genres".to_string(), "Action, Mecha".to_string());
        values.insert("TITLE".to_string(), "Cowboy Bebop".to_string());
        let prompt = t.render_prompt(&values, "In the year").unwrap();
        assert_eq!(
            prompt,
            "Genres: Action, Mecha\nTitle: Cowboy Bebop\nSynopsis: In the year"
        );
        assert!(t
            .render_document(&["Action, Mecha", "Cowboy Bebop"], "In the year 2071.")
            .starts_with(&prompt));
        values.remove("TITLE");
        assert_eq!(
            t.render_prompt(&values, "").unwrap(),
            "Genres: Action, Mecha\nSynopsis:"
        );
        values.insert("Score".to_string(), "9".to_string());
        let err = t.render_prompt(&values, "").unwrap_err();
        assert!(err.to_string().contains("\"Score\""), "{err}");
    }

    #[test]
    fn missing_or_repeated_columns_are_errors() {
        let err = ConditioningTemplate::resolve(&header(), &["Studio".to_string()]).unwrap_err();
        assert!(matches!(&err, DataError::MissingColumn { column, .. } if column == "Studio"));
        let err = ConditioningTemplate::resolve(&header(), &["Name".into(), "title".into()]);
        assert!(matches!(err, Err(DataError::InvalidOption(_))));
    }
}
