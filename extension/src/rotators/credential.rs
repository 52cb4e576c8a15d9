//! The credential JSON of database secrets:
//! `{"engine": "postgres", "host": "...", "port": 5432, "dbname": "...", "username": "...",
//! "password": "...", "master_secret": "..."}`. An empty or absent host is this cluster.
//!
//! Parse errors name the field, never its value.

use serde_json::{Map, Value};
use zeroize::Zeroizing;

pub struct Credential {
    fields: Map<String, Value>,
}

impl Drop for Credential {
    fn drop(&mut self) {
        // serde_json strings cannot be zeroized in place; take the password out and wipe it.
        if let Some(Value::String(password)) = self.fields.remove("password") {
            drop(Zeroizing::new(password));
        }
    }
}

impl Credential {
    pub fn parse(value: &[u8]) -> Result<Credential, String> {
        let fields = match serde_json::from_slice::<Value>(value) {
            Ok(Value::Object(fields)) => fields,
            _ => return Err("the value is not a credential JSON object".into()),
        };
        // A field of another type would otherwise read as absent: `"host": 5` as this
        // cluster, where the rotation would change another server's password.
        for field in [
            "engine",
            "host",
            "dbname",
            "username",
            "password",
            "master_secret",
        ] {
            if fields
                .get(field)
                .is_some_and(|value| !value.is_null() && !value.is_string())
            {
                return Err(format!("the credential's \"{field}\" is not a string"));
            }
        }
        let credential = Credential { fields };
        match credential.fields.get("engine").and_then(Value::as_str) {
            None | Some("postgres") | Some("postgresql") => {}
            Some(_) => return Err("the credential's engine is not postgres".into()),
        }
        for field in ["username", "password"] {
            if credential.text(field).is_none_or(str::is_empty) {
                return Err(format!("the credential lacks a non-empty \"{field}\""));
            }
        }
        credential.port()?;
        Ok(credential)
    }

    fn text(&self, field: &str) -> Option<&str> {
        self.fields.get(field).and_then(Value::as_str)
    }

    pub fn host(&self) -> Option<&str> {
        self.text("host").filter(|host| !host.is_empty())
    }

    pub fn is_local(&self) -> bool {
        self.host().is_none()
    }

    pub fn port(&self) -> Result<u16, String> {
        let port = match self.fields.get("port") {
            None | Some(Value::Null) => return Ok(5432),
            Some(Value::Number(number)) => number.as_u64(),
            Some(Value::String(text)) => text.parse().ok(),
            Some(_) => None,
        };
        port.and_then(|port| u16::try_from(port).ok())
            .filter(|port| *port != 0)
            .ok_or_else(|| "the credential's \"port\" is not a port number".into())
    }

    pub fn dbname(&self) -> &str {
        self.text("dbname")
            .filter(|name| !name.is_empty())
            .unwrap_or("postgres")
    }

    pub fn username(&self) -> &str {
        self.text("username").expect("checked by parse")
    }

    pub fn password(&self) -> &str {
        self.text("password").expect("checked by parse")
    }

    pub fn master_secret(&self) -> Option<&str> {
        self.text("master_secret").filter(|name| !name.is_empty())
    }

    /// The same credential with another user name and password, as stored JSON.
    pub fn with_login(&self, username: &str, password: &str) -> Zeroizing<Vec<u8>> {
        let mut fields = self.fields.clone();
        fields.insert("username".into(), Value::String(username.into()));
        fields.insert("password".into(), Value::String(password.into()));
        // Dropped as a Credential, so the copied password is wiped too.
        let updated = Credential { fields };
        Zeroizing::new(serde_json::to_vec(&updated.fields).expect("a JSON object serializes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_design_format() {
        let credential = Credential::parse(
            br#"{"engine":"postgres","host":"db1","port":"6543","dbname":"app","username":"u","password":"p"}"#,
        )
        .unwrap();
        assert_eq!(credential.host(), Some("db1"));
        assert_eq!(credential.port(), Ok(6543));
        assert_eq!(credential.dbname(), "app");
        assert!(!credential.is_local());
        let local = Credential::parse(br#"{"host":"","username":"u","password":"p"}"#).unwrap();
        assert!(local.is_local());
        assert_eq!(local.port(), Ok(5432));
        assert_eq!(local.dbname(), "postgres");
    }

    #[test]
    fn new_login_keeps_the_other_fields() {
        let credential = Credential::parse(
            br#"{"host":"h","username":"u","password":"p","master_secret":"admin","extra":1}"#,
        )
        .unwrap();
        let changed = credential.with_login("u_clone", "new");
        let changed = Credential::parse(&changed).unwrap();
        assert_eq!(changed.username(), "u_clone");
        assert_eq!(changed.password(), "new");
        assert_eq!(changed.master_secret(), Some("admin"));
        assert_eq!(changed.fields["extra"], 1);
    }

    #[test]
    fn errors_name_fields_not_values() {
        for (value, words) in [
            (&b"hunter2"[..], "not a credential JSON object"),
            (br#"{"username":"u"}"#, "\"password\""),
            (br#"{"password":"hunter2"}"#, "\"username\""),
            (
                br#"{"username":"u","password":"hunter2","port":70000}"#,
                "port",
            ),
            (
                br#"{"engine":"mysql","username":"u","password":"hunter2"}"#,
                "engine",
            ),
            (
                br#"{"host":5,"username":"u","password":"hunter2"}"#,
                "\"host\" is not a string",
            ),
            (
                br#"{"dbname":["x"],"username":"u","password":"hunter2"}"#,
                "\"dbname\" is not a string",
            ),
            (
                br#"{"master_secret":{},"username":"u","password":"hunter2"}"#,
                "\"master_secret\" is not a string",
            ),
            (
                br#"{"engine":1,"username":"u","password":"hunter2"}"#,
                "\"engine\" is not a string",
            ),
            (
                br#"{"username":"u","password":31337}"#,
                "\"password\" is not a string",
            ),
        ] {
            let error = Credential::parse(value).err().unwrap();
            assert!(error.contains(words), "{error}");
            assert!(!error.contains("hunter2") && !error.contains("31337"));
        }
        // JSON null is an absent field.
        let credential =
            Credential::parse(br#"{"host":null,"username":"u","password":"p"}"#).unwrap();
        assert!(credential.is_local());
    }
}
