//! A client's startup parameters as settings to apply to whichever backend serves it.
//!
//! Everything but `user`, `database`, `replication` and `_pq_.` protocol options becomes a
//! setting; `options` is split the way libpq's `pg_split_opts` does (whitespace separates,
//! backslash escapes) and accepts `-c name=value`, `-cname=value` and `--name=value`.
//! Settings are applied with `set_config(name, value, false)`, which parses the value as the
//! startup packet would (a plain `SET` would quote list values such as search_path as one item).

use postgres_protocol::escape::escape_literal;

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("unsupported command-line option {0:?} in \"options\"")]
    UnsupportedOption(String),
    #[error("invalid command-line option {0:?} in \"options\": expected name=value")]
    MissingValue(String),
    #[error("replication connections are not supported")]
    Replication,
}

/// The settings a client asked for, in order.
pub fn client_settings(
    params: &[(String, String)],
) -> Result<Vec<(String, String)>, SettingsError> {
    let mut settings = Vec::new();
    for (name, value) in params {
        if name == "replication" && !matches!(value.as_str(), "false" | "0" | "off" | "no") {
            return Err(SettingsError::Replication);
        }
        if name == "options" {
            settings.extend(parse_options(value)?);
        } else if !NOT_SETTINGS.contains(&name.as_str()) && !name.starts_with("_pq_.") {
            settings.push((name.clone(), value.clone()));
        }
    }
    // Kept for the client's whole life: no spare capacity (issue 12, idle memory).
    settings.shrink_to_fit();
    Ok(settings)
}

/// Splits the `options` startup parameter into settings.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, SettingsError> {
    let words = split_words(options);
    let mut settings = Vec::new();
    let mut iter = words.into_iter();
    while let Some(word) = iter.next() {
        let assignment = if word == "-c" {
            iter.next()
                .ok_or_else(|| SettingsError::MissingValue(word.clone()))?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err(SettingsError::UnsupportedOption(word));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| SettingsError::MissingValue(assignment.clone()))?;
        if name.is_empty() {
            return Err(SettingsError::MissingValue(assignment.clone()));
        }
        settings.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(settings)
}

fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut current));
                in_word = false;
            }
            continue;
        }
        in_word = true;
        if c == '\\' {
            if let Some(next) = chars.next() {
                current.push(next);
            }
        } else {
            current.push(c);
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

/// One query that applies all settings, or `None` when there are none.
pub fn settings_query(settings: &[(String, String)]) -> Option<String> {
    if settings.is_empty() {
        return None;
    }
    let calls: Vec<String> = settings
        .iter()
        .map(|(name, value)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                escape_literal(name),
                escape_literal(value)
            )
        })
        .collect();
    Some(format!("SELECT {}", calls.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn startup_params_become_settings() {
        let p = params(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "psql"),
            ("_pq_.x", "1"),
            (
                "options",
                "-c statement_timeout=5s --search-path=a,b -cwork_mem=4MB",
            ),
        ]);
        assert_eq!(
            client_settings(&p).unwrap(),
            params(&[
                ("application_name", "psql"),
                ("statement_timeout", "5s"),
                ("search_path", "a,b"),
                ("work_mem", "4MB"),
            ])
        );
    }

    #[test]
    fn backslash_escapes_spaces() {
        assert_eq!(
            parse_options(r"-c application_name=my\ app").unwrap(),
            params(&[("application_name", "my app")])
        );
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(parse_options("-d 5").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c novalue").is_err());
        assert_eq!(
            client_settings(&params(&[("replication", "database")])),
            Err(SettingsError::Replication)
        );
    }

    #[test]
    fn query_quotes_values() {
        let q = settings_query(&params(&[("application_name", "it's")])).unwrap();
        assert_eq!(
            q,
            "SELECT pg_catalog.set_config('application_name', 'it''s', false)"
        );
        assert!(settings_query(&[]).is_none());
    }
}
