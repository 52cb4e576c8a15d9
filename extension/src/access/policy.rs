//! Resource policies on a secret:
//! `{"statements": [{"effect": "allow"|"deny", "principals": ["role", ...] | "*",
//!   "actions": ["get", ...], "conditions": {"source_cidr": [...], "application_name": [...],
//!   "not_before": "<RFC 3339>", "not_after": "<RFC 3339>"}}]}`.
//!
//! Parsing is pure: role names are resolved by the caller-supplied function, so this module is
//! tested without a server.

use super::Actions;
use serde_json::Value;
use std::net::IpAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, PartialEq)]
pub enum Principals<R> {
    Everyone,
    Roles(Vec<R>),
}

impl<R> Principals<R> {
    /// Whether the statement names everyone, or a role `is_one` says the caller is.
    pub fn include(&self, mut is_one: impl FnMut(&R) -> bool) -> bool {
        match self {
            Principals::Everyone => true,
            Principals::Roles(roles) => roles.iter().any(&mut is_one),
        }
    }
}

/// Where a session comes from, for `source_cidr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Unix-socket connection (`"local"` in policies).
    Local,
    Ip(IpAddr),
}

#[derive(Debug, PartialEq)]
enum SourceRule {
    Local,
    Cidr(IpAddr, u8),
}

#[derive(Debug, Default, PartialEq)]
pub struct Conditions {
    source: Option<Vec<SourceRule>>,
    application_name: Option<Vec<String>>,
    /// Unix microseconds.
    not_before: Option<i64>,
    not_after: Option<i64>,
}

/// What conditions are evaluated against.
pub struct Session<'a> {
    pub source: Option<Source>,
    pub application_name: &'a str,
    pub now_micros: i64,
}

impl Conditions {
    pub fn is_empty(&self) -> bool {
        *self == Conditions::default()
    }

    pub fn met_by(&self, session: &Session) -> bool {
        let source_ok = self.source.as_ref().is_none_or(|rules| {
            session
                .source
                .is_some_and(|source| rules.iter().any(|rule| rule.admits(source)))
        });
        let application_ok = self
            .application_name
            .as_ref()
            .is_none_or(|names| names.iter().any(|name| name == session.application_name));
        source_ok
            && application_ok
            && self.not_before.is_none_or(|t| session.now_micros >= t)
            && self.not_after.is_none_or(|t| session.now_micros < t)
    }
}

impl SourceRule {
    fn parse(text: &str) -> Result<SourceRule, String> {
        if text == "local" {
            return Ok(SourceRule::Local);
        }
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| {
            format!("source_cidr \"{text}\" is not an address, a CIDR or \"local\"")
        })?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= max)
                .ok_or_else(|| format!("source_cidr \"{text}\" has a bad prefix length"))?,
        };
        Ok(SourceRule::Cidr(address, prefix))
    }

    fn admits(&self, source: Source) -> bool {
        match (self, source) {
            (SourceRule::Local, Source::Local) => true,
            (SourceRule::Cidr(network, prefix), Source::Ip(address)) => {
                in_network(*network, *prefix, address)
            }
            _ => false,
        }
    }
}

fn in_network(network: IpAddr, prefix: u8, address: IpAddr) -> bool {
    let address = match (network, address) {
        (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(address),
        _ => address,
    };
    let bits = |ip: IpAddr| -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
            IpAddr::V6(v6) => u128::from(v6),
        }
    };
    if network.is_ipv4() != address.is_ipv4() {
        return false;
    }
    let width = if network.is_ipv4() { 32 } else { 128 };
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix).min(width))
    };
    bits(network) & mask == bits(address) & mask
}

#[derive(Debug)]
pub struct Statement<R> {
    pub effect: Effect,
    pub principals: Principals<R>,
    pub actions: Actions,
    pub conditions: Conditions,
}

#[derive(Debug)]
pub struct Policy<R> {
    pub statements: Vec<Statement<R>>,
}

/// A finding of `validate_resource_policy`: which statement (1-based; 0 for the document),
/// and what is wrong with it.
#[derive(Debug, PartialEq)]
pub struct Finding {
    pub statement: i32,
    pub problem: String,
}

fn strings(value: &Value, what: &str) -> Result<Vec<String>, String> {
    match value {
        Value::String(text) => Ok(vec![text.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{what} must be strings"))
            })
            .collect(),
        _ => Err(format!("{what} must be a string or an array of strings")),
    }
}

fn timestamp(value: &Value, what: &str) -> Result<i64, String> {
    value
        .as_str()
        .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
        .map(|time| time.timestamp_micros())
        .ok_or_else(|| format!("{what} must be an RFC 3339 timestamp such as 2027-01-01T00:00:00Z"))
}

fn parse_conditions(value: Option<&Value>) -> Result<Conditions, String> {
    let Some(value) = value else {
        return Ok(Conditions::default());
    };
    let fields = value.as_object().ok_or("conditions must be an object")?;
    let mut conditions = Conditions::default();
    for (key, value) in fields {
        match key.as_str() {
            "source_cidr" => {
                conditions.source = Some(
                    strings(value, "source_cidr")?
                        .iter()
                        .map(|text| SourceRule::parse(text))
                        .collect::<Result<_, _>>()?,
                )
            }
            "application_name" => {
                conditions.application_name = Some(strings(value, "application_name")?)
            }
            "not_before" => conditions.not_before = Some(timestamp(value, "not_before")?),
            "not_after" => conditions.not_after = Some(timestamp(value, "not_after")?),
            other => return Err(format!("unknown condition \"{other}\"")),
        }
    }
    Ok(conditions)
}

/// Parses a policy. A problem that makes a statement meaningless (a bad shape, an unknown
/// action or condition) is an error: the first statement's with one is returned, and those of
/// later statements go to `findings`. An unknown role is reported through `findings` and the
/// role is left out, and so is a statement that lets everyone `get`.
pub fn parse<R>(
    document: &Value,
    resolve_role: &mut dyn FnMut(&str) -> Option<R>,
    findings: &mut Vec<Finding>,
) -> Result<Policy<R>, Finding> {
    let document_error = |problem: &str| Finding {
        statement: 0,
        problem: problem.to_string(),
    };
    let statements = document
        .as_object()
        .filter(|fields| fields.keys().all(|key| key == "statements"))
        .and_then(|fields| fields.get("statements"))
        .and_then(Value::as_array)
        .ok_or_else(|| document_error("a policy is {\"statements\": [...]} and nothing else"))?;
    let mut parsed = Vec::with_capacity(statements.len());
    let mut first_fatal = None;
    for (index, statement) in statements.iter().enumerate() {
        // Every malformed statement is reported, not only the first, so that a policy can be
        // fixed in one go.
        match parse_statement(index as i32 + 1, statement, resolve_role, findings) {
            Ok(statement) => parsed.push(statement),
            Err(fatal) if first_fatal.is_none() => first_fatal = Some(fatal),
            Err(fatal) => findings.push(fatal),
        }
    }
    match first_fatal {
        Some(fatal) => Err(fatal),
        None => Ok(Policy { statements: parsed }),
    }
}

/// One statement (`number`, 1-based): its first problem that makes it meaningless is the
/// error; what `parse` reports through `findings` goes there.
fn parse_statement<R>(
    number: i32,
    statement: &Value,
    resolve_role: &mut dyn FnMut(&str) -> Option<R>,
    findings: &mut Vec<Finding>,
) -> Result<Statement<R>, Finding> {
    let fail = |problem: String| Finding {
        statement: number,
        problem,
    };
    let fields = statement
        .as_object()
        .ok_or_else(|| fail("a statement must be an object".into()))?;
    if let Some(key) = fields
        .keys()
        .find(|key| !["effect", "principals", "actions", "conditions"].contains(&key.as_str()))
    {
        return Err(fail(format!("unknown field \"{key}\"")));
    }
    let effect = match fields.get("effect").and_then(Value::as_str) {
        Some("allow") => Effect::Allow,
        Some("deny") => Effect::Deny,
        _ => return Err(fail("effect must be \"allow\" or \"deny\"".into())),
    };
    let principals = match fields.get("principals") {
        Some(Value::String(star)) if star == "*" => Principals::Everyone,
        Some(value @ Value::Array(_)) => {
            let mut roles = Vec::new();
            for name in strings(value, "principals").map_err(fail)? {
                if name == "*" {
                    return Err(fail("write \"principals\": \"*\" for everyone".into()));
                }
                match resolve_role(&name) {
                    Some(role) => roles.push(role),
                    None => findings.push(Finding {
                        statement: number,
                        problem: format!("unknown role \"{name}\""),
                    }),
                }
            }
            Principals::Roles(roles)
        }
        _ => {
            return Err(fail(
                "principals must be \"*\" or an array of role names".into(),
            ))
        }
    };
    let action_names = fields
        .get("actions")
        .map(|value| strings(value, "actions"))
        .transpose()
        .map_err(fail)?
        .filter(|names| !names.is_empty())
        .ok_or_else(|| fail("actions must name at least one action".into()))?;
    let actions = Actions::parse(&action_names).map_err(fail)?;
    let conditions = parse_conditions(fields.get("conditions")).map_err(fail)?;
    if effect == Effect::Allow
        && matches!(principals, Principals::Everyone)
        && actions.contains(super::Action::Get)
    {
        findings.push(Finding {
            statement: number,
            problem: "grants get to everyone (\"principals\": \"*\")".into(),
        });
    }
    Ok(Statement {
        effect,
        principals,
        actions,
        conditions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resolve(name: &str) -> Option<u32> {
        ["payments", "ops"]
            .iter()
            .position(|n| *n == name)
            .map(|i| i as u32)
    }

    fn session(source: Option<Source>, application_name: &str) -> Session<'_> {
        Session {
            source,
            application_name,
            now_micros: 1_800_000_000_000_000,
        }
    }

    #[test]
    fn parses_statements_and_reports_findings() {
        let mut findings = Vec::new();
        let policy = parse(
            &json!({"statements": [
                {"effect": "allow", "principals": ["payments", "ghost"], "actions": ["get", "describe"]},
                {"effect": "deny", "principals": "*", "actions": "put",
                 "conditions": {"source_cidr": ["10.0.0.0/8", "local"], "not_after": "2027-01-01T00:00:00Z"}},
                {"effect": "allow", "principals": "*", "actions": ["get"]}
            ]}),
            &mut resolve,
            &mut findings,
        )
        .unwrap();
        assert_eq!(policy.statements.len(), 3);
        assert_eq!(policy.statements[0].principals, Principals::Roles(vec![0]));
        assert_eq!(
            findings,
            vec![
                Finding {
                    statement: 1,
                    problem: "unknown role \"ghost\"".into()
                },
                Finding {
                    statement: 3,
                    problem: "grants get to everyone (\"principals\": \"*\")".into()
                },
            ]
        );
    }

    #[test]
    fn reports_every_malformed_statement() {
        let mut findings = Vec::new();
        let first = parse(
            &json!({"statements": [
                {"effect": "allow", "principals": "*", "actions": ["get", "fly"]},
                {"effect": "maybe"},
                {"effect": "allow", "principals": ["ghost"], "actions": ["get"]}
            ]}),
            &mut resolve,
            &mut findings,
        )
        .unwrap_err();
        assert_eq!(first.statement, 1);
        assert!(
            first.problem.starts_with("unknown action \"fly\""),
            "{}",
            first.problem
        );
        let later: Vec<_> = findings
            .iter()
            .map(|finding| (finding.statement, finding.problem.as_str()))
            .collect();
        assert_eq!(
            later,
            [
                (2, "effect must be \"allow\" or \"deny\""),
                (3, "unknown role \"ghost\"")
            ]
        );
    }

    #[test]
    fn refuses_what_it_cannot_enforce() {
        for (document, words) in [
            (json!([]), "nothing else"),
            (json!({"statements": [], "extra": 1}), "nothing else"),
            (
                json!({"statements": [{"effect": "maybe", "principals": "*", "actions": ["get"]}]}),
                "effect",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": ["read"]}]}),
                "unknown action \"read\"",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": []}]}),
                "at least one action",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": 5, "actions": ["get"]}]}),
                "principals",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": ["*"], "actions": ["get"]}]}),
                "\"principals\": \"*\"",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": ["get"], "when": 1}]}),
                "unknown field \"when\"",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": ["get"], "conditions": {"ip": "1.2.3.4"}}]}),
                "unknown condition \"ip\"",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": ["get"], "conditions": {"source_cidr": "10.0.0.0/33"}}]}),
                "prefix length",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": ["get"], "conditions": {"source_cidr": "ten"}}]}),
                "not an address",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": ["get"], "conditions": {"not_before": "tomorrow"}}]}),
                "RFC 3339",
            ),
            (json!({"statements": [5]}), "a statement must be an object"),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": ["get"], "conditions": []}]}),
                "conditions must be an object",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": [1]}]}),
                "actions must be strings",
            ),
            (
                json!({"statements": [{"effect": "allow", "principals": "*", "actions": ["get"], "conditions": {"source_cidr": 5}}]}),
                "source_cidr must be a string or an array of strings",
            ),
        ] {
            let error = parse(&document, &mut resolve, &mut Vec::new()).unwrap_err();
            assert!(
                error.problem.contains(words),
                "{}: {document}",
                error.problem
            );
        }
    }

    #[test]
    fn conditions() {
        let conditions = parse_conditions(Some(&json!({
            "source_cidr": ["10.1.0.0/16", "::1", "local"],
            "application_name": ["billing"],
            "not_before": "2020-01-01T00:00:00Z",
            "not_after": "2030-01-01T00:00:00Z",
        })))
        .unwrap();
        let ip = |text: &str| Some(Source::Ip(text.parse().unwrap()));
        assert!(conditions.met_by(&session(ip("10.1.2.3"), "billing")));
        assert!(conditions.met_by(&session(ip("::ffff:10.1.2.3"), "billing")));
        assert!(conditions.met_by(&session(ip("::1"), "billing")));
        assert!(conditions.met_by(&session(Some(Source::Local), "billing")));
        assert!(!conditions.met_by(&session(ip("10.2.0.1"), "billing")));
        assert!(!conditions.met_by(&session(ip("10.1.2.3"), "psql")));
        assert!(!conditions.met_by(&session(None, "billing")));
        let late = Session {
            now_micros: 1_950_000_000_000_000,
            ..session(ip("10.1.2.3"), "billing")
        };
        assert!(!conditions.met_by(&late));
        assert!(parse_conditions(None).unwrap().met_by(&session(None, "")));
        assert!(in_network(
            "0.0.0.0".parse().unwrap(),
            0,
            "8.8.8.8".parse().unwrap()
        ));
    }
}
