//! Renders a request into the exact text a conditioned checkpoint was trained on, so that
//! `{"Genres": "Mecha"}` plus a prompt reads to the model like the header of a training example.
//!
//! The template is stored by the trainer in the checkpoint manifest's metadata:
//! `{"conditioning": {"columns": ["Genres", "Name"], "labels": ["Genres", "Title"],
//! "text_label": "Synopsis"}}` (`labels` default to the column names, `text_label` to
//! "Synopsis"). A training example then reads `Genres: …\nTitle: …\nSynopsis: <text>`.

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

/// The text fed to the model: the header lines of the given conditions (in the template's
/// order, missing ones omitted), then `<text_label>: <prompt>`. Keys that are not condition
/// columns of the checkpoint are refused, naming `conditions.<key>`.
pub fn render(
    template: Option<&Conditioning>,
    checkpoint_id: &str,
    prompt: &str,
    conditions: &BTreeMap<String, String>,
) -> Result<String, FieldError> {
    let columns: &[String] = template.map(|t| t.columns.as_slice()).unwrap_or(&[]);
    if let Some(key) = conditions.keys().find(|k| !columns.contains(k)) {
        let known = if columns.is_empty() {
            "it was trained without conditions".to_string()
        } else {
            format!("its columns are {}", columns.join(", "))
        };
        return Err(FieldError::new(
            format!("conditions.{key}"),
            format!("is not a condition column of checkpoint {checkpoint_id} ({known})"),
        ));
    }
    let Some(t) = template else {
        return Ok(if prompt.is_empty() {
            START_OF_DOCUMENT.to_string()
        } else {
            prompt.to_string()
        });
    };
    let mut out = String::new();
    for (column, label) in t.columns.iter().zip(&t.labels) {
        if let Some(value) = conditions.get(column).filter(|v| !v.trim().is_empty()) {
            out.push_str(label);
            out.push_str(": ");
            out.push_str(value.trim());
            out.push('\n');
        }
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
    fn unconditioned_prompts_pass_through() {
        let none = BTreeMap::new();
        assert_eq!(render(None, "ck", "A boy", &none).unwrap(), "A boy");
        assert_eq!(render(None, "ck", "", &none).unwrap(), START_OF_DOCUMENT);
    }
}
