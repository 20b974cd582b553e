//! Renders a request into the exact text a conditioned checkpoint was trained on, so that
//! `{"Genres": "Mecha"}` plus a prompt reads to the model like the header of a training example.
//!
//! The template is stored by the trainer in the checkpoint manifest's metadata:
//! `{"conditioning": {"columns": ["Genres", "Name"], "labels": ["Genres", "Title"],
//! "text_label": "Synopsis"}}` (`labels` default to the column names, `text_label` to
//! "Synopsis"). A training example then reads `Genres: …\nTitle: …\nSynopsis: <text>`,
//! which is what the trainer's `ConditioningTemplate` writes.

use std::collections::BTreeMap;

use crate::validation::FieldError;

/// What an unconditioned model is fed for an empty prompt: GPT-2's document separator, so the
/// model starts a new synopsis from nothing.
pub const START_OF_DOCUMENT: &str = "<|endoftext|>";

/// The conditioning header of one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conditioning {
    pub columns: Vec<String>,
    pub labels: Vec<String>,
    pub text_label: String,
}

impl Conditioning {
    /// Reads `metadata.conditioning`; `Ok(None)` for a checkpoint trained on plain synopses.
    pub fn from_metadata(metadata: &serde_json::Value) -> Result<Option<Self>, String> {
        let Some(c) = metadata.get("conditioning").filter(|c| !c.is_null()) else {
            return Ok(None);
        };
        let strings = |key: &str| -> Result<Vec<String>, String> {
            match c.get(key) {
                None | Some(serde_json::Value::Null) => Ok(Vec::new()),
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            format!("metadata.conditioning.{key} holds a non-string")
                        })
                    })
                    .collect(),
                Some(_) => Err(format!("metadata.conditioning.{key} is not a list")),
            }
        };
        let columns = strings("columns")?;
        if columns.is_empty() {
            return Ok(None);
        }
        let mut labels = strings("labels")?;
        if labels.len() != columns.len() {
            labels = columns.clone();
        }
        let text_label = c
            .get("text_label")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("Synopsis")
            .to_string();
        Ok(Some(Conditioning {
            columns,
            labels,
            text_label,
        }))
    }
}

/// Header names that mean the same thing in the corpora the trainer reads (the trainer's
/// aliases, so a prompt may say "title" for a model trained on a `Name` column).
const ALIASES: [(&[&str], &str); 2] = [
    (&["name", "title"], "Title"),
    (&["genres", "genders", "genre", "listed_in"], "Genres"),
];

impl Conditioning {
    /// Which header line a request key fills: a column or label (any case), or an alias.
    fn position_of(&self, key: &str) -> Option<usize> {
        let key = key.trim();
        let direct = self
            .labels
            .iter()
            .zip(&self.columns)
            .position(|(l, c)| l.eq_ignore_ascii_case(key) || c.eq_ignore_ascii_case(key));
        direct.or_else(|| {
            let (_, label) = ALIASES
                .iter()
                .find(|(names, _)| names.iter().any(|a| a.eq_ignore_ascii_case(key)))?;
            self.labels.iter().position(|l| l == label)
        })
    }
}

/// The text fed to the model, exactly as the trainer renders a training document: one
/// `<Label>: <value>` line per condition given (template order, whitespace collapsed, empty
/// ones omitted), then `<text_label>: <prompt>`. A key that is not a condition column (or
/// label, or alias) of the checkpoint is refused, naming `conditions.<key>`.
pub fn render(
    template: Option<&Conditioning>,
    checkpoint_id: &str,
    prompt: &str,
    conditions: &BTreeMap<String, String>,
) -> Result<String, FieldError> {
    let unknown = |key: &str| {
        let known = match template {
            None => "it was trained without conditions".to_string(),
            Some(t) => format!("its columns are {}", t.columns.join(", ")),
        };
        FieldError::new(
            format!("conditions.{key}"),
            format!("is not a condition column of checkpoint {checkpoint_id} ({known})"),
        )
    };
    let prompt = prompt.trim_start();
    let Some(t) = template else {
        if let Some(key) = conditions.keys().next() {
            return Err(unknown(key));
        }
        return Ok(if prompt.is_empty() {
            START_OF_DOCUMENT.to_string()
        } else {
            prompt.to_string()
        });
    };
    let mut by_position: Vec<Option<(&str, &str)>> = vec![None; t.labels.len()];
    for (key, value) in conditions {
        let position = t.position_of(key).ok_or_else(|| unknown(key))?;
        if let Some((other, _)) = by_position[position] {
            return Err(FieldError::new(
                format!("conditions.{key}"),
                format!(
                    "fills the same line ({}) as conditions.{other}",
                    t.labels[position]
                ),
            ));
        }
        by_position[position] = Some((key, value));
    }
    let mut out = String::new();
    for (label, given) in t.labels.iter().zip(by_position) {
        let mut words = given.map(|(_, v)| v).unwrap_or("").split_whitespace();
        let Some(first) = words.next() else {
            continue;
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
    out.push_str(&t.text_label);
    out.push(':');
    // Without a prompt the text ends at the colon: GPT-2's tokenizer attaches the space to
    // the next word, so a trailing space would be a token the model never saw there.
    if !prompt.is_empty() {
        out.push(' ');
        out.push_str(prompt);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn genres_title() -> Conditioning {
        Conditioning::from_metadata(&json!({"conditioning": {
            "columns": ["Genres", "Name"], "labels": ["Genres", "Title"]}}))
        .unwrap()
        .unwrap()
    }

    #[test]
    fn plain_checkpoints_have_no_template() {
        assert_eq!(Conditioning::from_metadata(&json!({})).unwrap(), None);
        assert_eq!(Conditioning::from_metadata(&json!(null)).unwrap(), None);
        assert_eq!(
            Conditioning::from_metadata(&json!({"conditioning": {"columns": []}})).unwrap(),
            None
        );
        assert!(Conditioning::from_metadata(&json!({"conditioning": {"columns": 3}})).is_err());
    }

    #[test]
    fn renders_the_training_header() {
        let t = genres_title();
        let c: BTreeMap<_, _> = [
            ("Name".to_string(), "Steel Sky".to_string()),
            ("Genres".to_string(), "Action, Mecha".to_string()),
        ]
        .into();
        let s = render(Some(&t), "ck", "In 2087", &c).unwrap();
        assert_eq!(
            s,
            "Genres: Action, Mecha\nTitle: Steel Sky\nSynopsis: In 2087"
        );
    }

    #[test]
    fn missing_columns_are_omitted_and_empty_prompt_ends_at_the_colon() {
        let t = genres_title();
        let c: BTreeMap<_, _> = [("Genres".to_string(), "Drama".to_string())].into();
        assert_eq!(
            render(Some(&t), "ck", "", &c).unwrap(),
            "Genres: Drama\nSynopsis:"
        );
    }

    #[test]
    fn unknown_columns_are_named() {
        let t = genres_title();
        let c: BTreeMap<_, _> = [("Studio".to_string(), "X".to_string())].into();
        let e = render(Some(&t), "ck", "p", &c).unwrap_err();
        assert_eq!(e.field, "conditions.Studio");
        let e = render(None, "ck", "p", &c).unwrap_err();
        assert!(e.message.starts_with("conditions.Studio "), "{}", e.message);
    }

    #[test]
    fn keys_may_be_labels_any_case_or_aliases_and_values_are_collapsed() {
        let t = genres_title();
        let c: BTreeMap<_, _> = [
            ("title".to_string(), " Steel\n  Sky ".to_string()),
            ("GENDERS".to_string(), "Action,\tMecha".to_string()),
        ]
        .into();
        let s = render(Some(&t), "ck", "  In 2087", &c).unwrap();
        assert_eq!(
            s,
            "Genres: Action, Mecha\nTitle: Steel Sky\nSynopsis: In 2087"
        );

        let twice: BTreeMap<_, _> = [
            ("Name".to_string(), "A".to_string()),
            ("Title".to_string(), "B".to_string()),
        ]
        .into();
        let e = render(Some(&t), "ck", "", &twice).unwrap_err();
        assert_eq!(e.field, "conditions.Title");
    }

    #[test]
    fn unconditioned_prompts_pass_through() {
        let none = BTreeMap::new();
        assert_eq!(render(None, "ck", "A boy", &none).unwrap(), "A boy");
        assert_eq!(render(None, "ck", "", &none).unwrap(), START_OF_DOCUMENT);
    }
}
