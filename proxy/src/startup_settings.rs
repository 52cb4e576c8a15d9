//! Which server settings a client's startup packet may carry to the server. PostgreSQL takes
//! every startup parameter but `user`, `database`, `options` and `replication` as a setting,
//! and `options` as command-line switches. Nearly all of them are the session's own business,
//! judged by the server with the route's role. One is not: `post_auth_delay` (also `-W` in
//! `options`) makes the server process sleep after authentication, past the proxy's login
//! timeout, so every attempt would hold one of the server's connection slots for as long as the
//! client asked, whatever the proxy's limits.

use crate::error::ProxyError;
use std::collections::BTreeMap;

const REFUSED_SETTINGS: [&str; 1] = ["post_auth_delay"];

pub fn check(parameters: &BTreeMap<String, String>) -> Result<(), ProxyError> {
    for (key, value) in parameters {
        match key.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                for name in settings_in_options(value)? {
                    refuse_if_listed(&name)?;
                }
            }
            name => refuse_if_listed(name)?,
        }
    }
    Ok(())
}

/// Setting names are case-insensitive, and in `options` a `-` in a name reads as `_`.
fn refuse_if_listed(name: &str) -> Result<(), ProxyError> {
    let normalized = name.to_ascii_lowercase().replace('-', "_");
    if REFUSED_SETTINGS.contains(&normalized.as_str()) {
        return Err(ProxyError::RefusedSetting(name.to_string()));
    }
    Ok(())
}

/// The names set by `options`, split as PostgreSQL splits it (words separated by white space,
/// a backslash taking the next character as it is). Only `-c name=value`, `-cname=value` and
/// `--name=value` are passed on: the other switches (`-W` among them) are refused rather than
/// interpreted.
fn settings_in_options(options: &str) -> Result<Vec<String>, ProxyError> {
    let mut words = split_words(options).into_iter();
    let mut names = Vec::new();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next().unwrap_or_default()
        } else if let Some(setting) = word.strip_prefix("--").or(word.strip_prefix("-c")) {
            setting.to_string()
        } else {
            return Err(ProxyError::UnsupportedOption(word));
        };
        let name = setting.split('=').next().unwrap_or_default();
        names.push(name.to_string());
    }
    Ok(names)
}

fn split_words(options: &str) -> Vec<String> {
    let (mut words, mut word, mut in_word, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in options.chars() {
        if escaped {
            word.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
            in_word = true;
        } else if matches!(c, ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r') {
            if in_word {
                words.push(std::mem::take(&mut word));
                in_word = false;
            }
        } else {
            word.push(c);
            in_word = true;
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameters(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn session_settings_pass() {
        for options in [
            "-c statement_timeout=5s",
            "-csearch_path=app,public --work_mem=64MB",
            r"-c application_name=a\ b  -c lock-timeout=1s",
            "",
        ] {
            let startup = parameters(&[("user", "u"), ("options", options), ("TimeZone", "UTC")]);
            assert!(check(&startup).is_ok(), "{options}");
        }
    }

    #[test]
    fn a_login_delay_is_refused_however_spelled() {
        for pairs in [
            [("post_auth_delay", "60")],
            [("POST_AUTH_DELAY", "60")],
            [("options", "-c post_auth_delay=60")],
            [("options", "-cpost-auth-delay=60")],
            [("options", "--Post_Auth_Delay=60")],
            [("options", "-c work_mem=1MB\t-c post_auth_delay=60")],
        ] {
            let error = check(&parameters(&pairs)).unwrap_err();
            assert_eq!(error.sqlstate(), "42501", "{pairs:?}: {error}");
        }
    }

    #[test]
    fn other_switches_are_refused_rather_than_interpreted() {
        for options in ["-W 60", "-W60", "-eW60", "-d 5", "stray"] {
            let error = check(&parameters(&[("options", options)])).unwrap_err();
            assert_eq!(error.sqlstate(), "0A000", "{options}: {error}");
        }
    }
}
