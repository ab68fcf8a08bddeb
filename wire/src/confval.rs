//! Config-file values that the command line takes as text. A flag is always a string, so
//! `--interval 10` reaches [`crate::parse_duration`] as `"10"`; in TOML `interval = 10` is an
//! integer. These deserializers turn TOML numbers into the same text, so a file means what
//! the same flag means (10 s here), and every spelling goes through one parser.

use serde::{Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrNumber {
    Text(String),
    Int(i64),
    Float(f64),
}

impl TextOrNumber {
    fn into_text(self) -> String {
        match self {
            TextOrNumber::Text(s) => s,
            TextOrNumber::Int(n) => n.to_string(),
            TextOrNumber::Float(f) => f.to_string(),
        }
    }
}

/// For `Option<String>` settings parsed later as a duration, size, rate or share:
/// `#[serde(default, deserialize_with = "phoenix_wire::confval::opt_text")]`.
pub fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<TextOrNumber>::deserialize(d)?.map(TextOrNumber::into_text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct S {
        #[serde(deserialize_with = "opt_text")]
        v: Option<String>,
    }

    fn v(json: &str) -> Option<String> {
        serde_json::from_str::<S>(json).unwrap().v
    }

    #[test]
    fn numbers_become_the_text_a_flag_would_give() {
        assert_eq!(v(r#"{"v": 10}"#).as_deref(), Some("10"));
        assert_eq!(v(r#"{"v": 2.5}"#).as_deref(), Some("2.5"));
        assert_eq!(v(r#"{"v": "10s"}"#).as_deref(), Some("10s"));
        assert_eq!(v("{}"), None);
        assert!(serde_json::from_str::<S>(r#"{"v": [1]}"#).is_err());
        assert_eq!(
            crate::parse_duration(&v(r#"{"v": 10}"#).unwrap()).unwrap(),
            std::time::Duration::from_secs(10)
        );
    }
}
