//! Where the store lives: a SQLite file (one gateway) or a PostgreSQL database (several
//! replicas writing one log). A PostgreSQL URL carries a password, so it is kept as a
//! [`Secret`] and only its redacted form is ever displayed or debugged.

use std::path::PathBuf;

use crate::secret::Secret;

/// A SQLite file or a PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(PostgresUrl),
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "{}", path.display()),
            StoreLocation::Postgres(url) => write!(f, "{url}"),
        }
    }
}

/// Why a store URL was refused. Never contains the URL itself.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not a `postgres://` or `postgresql://` URL.
    #[error(
        "expected postgres://user:password@host:port/database (for SQLite set store.path or --store instead)"
    )]
    Scheme,
    /// The PostgreSQL client cannot read it.
    #[error("invalid PostgreSQL URL: {0}")]
    Invalid(String),
}

/// A `postgres://user:password@host:port/database` URL. `Display` and `Debug` show it with the
/// password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    url: Secret,
    redacted: String,
}

/// Serialises redacted, like `Display`: a configuration written out never carries the password.
impl serde::Serialize for PostgresUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted)
    }
}

impl PostgresUrl {
    /// Parses `text` after expanding `${VAR}` references (so the password can come from the
    /// environment rather than the configuration file).
    pub fn parse(text: &str) -> Result<PostgresUrl, UrlError> {
        let url = crate::policy::expand_env(text.trim());
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(UrlError::Scheme);
        }
        let config: postgres::Config = url.parse().map_err(|e: postgres::Error| {
            // The parser's messages name the option, never its value; strip any echo anyway.
            UrlError::Invalid(redact(&e.to_string(), None))
        })?;
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let redacted = redact(&url, password.as_deref());
        Ok(PostgresUrl {
            url: Secret::new(url),
            redacted,
        })
    }

    /// The client configuration (with the password).
    pub(super) fn config(&self) -> Result<postgres::Config, UrlError> {
        self.url
            .expose()
            .parse()
            .map_err(|e: postgres::Error| UrlError::Invalid(redact(&e.to_string(), None)))
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl std::fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresUrl({})", self.redacted)
    }
}

impl<'de> serde::Deserialize<'de> for PostgresUrl {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        // The YAML error names the enclosing section; this names the field.
        PostgresUrl::parse(&text).map_err(|e| serde::de::Error::custom(format_args!("url: {e}")))
    }
}

/// `text` with the user-info password, any `password=` query value, and every occurrence of
/// `password` (the decoded one the client read) replaced by `***`.
fn redact(text: &str, password: Option<&str>) -> String {
    let mut out = match text.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("{userinfo}@{host}"),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{}", redact_query(tail))
        }
        None => text.to_owned(),
    };
    if let Some(password) = password.filter(|p| !p.is_empty()) {
        out = out.replace(password, "***");
    }
    out
}

fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_shown() {
        let cases = [
            (
                "postgres://tw:s3cr3t-pw@db.internal:5432/tripwire",
                "postgres://tw:***@db.internal:5432/tripwire",
            ),
            (
                "postgresql://tw@db/tripwire?password=s3cr3t-pw&sslmode=disable",
                "postgresql://tw@db/tripwire?password=***&sslmode=disable",
            ),
            (
                "postgres://tw:s3cr3t%2Dpw@db?connect_timeout=5",
                "postgres://tw:***@db?connect_timeout=5",
            ),
        ];
        for (raw, shown) in cases {
            let url = PostgresUrl::parse(raw).unwrap();
            assert_eq!(url.to_string(), shown);
            assert!(!format!("{url:?}").contains("s3cr3t"), "{url:?}");
            let location = StoreLocation::Postgres(url);
            assert!(!format!("{location} {location:?}").contains("s3cr3t"));
        }
    }

    #[test]
    fn the_password_may_come_from_the_environment() {
        // PATH is always set; any variable shows the expansion.
        let path = std::env::var("PATH").unwrap();
        let url = PostgresUrl::parse("postgres://tw:${PATH}@db/t").unwrap();
        assert_eq!(url.config().unwrap().get_password(), Some(path.as_bytes()));
        assert_eq!(url.to_string(), "postgres://tw:***@db/t");
    }

    #[test]
    fn other_schemes_and_bad_urls_are_refused_without_echo() {
        let err = PostgresUrl::parse("mysql://u:s3cr3t@h/db").unwrap_err();
        assert!(err.to_string().contains("postgres://"), "{err}");
        assert!(!err.to_string().contains("s3cr3t"));
        let err = PostgresUrl::parse("postgres://u:s3cr3t@h:notaport/db").unwrap_err();
        assert!(
            err.to_string().starts_with("invalid PostgreSQL URL"),
            "{err}"
        );
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn a_bad_url_in_the_config_file_names_file_line_and_column() {
        let path = std::path::Path::new("gw.yaml");
        let text = "store:\n  url: \"mysql://u:s3cr3t@h/db\"\n";
        let err = crate::config::Config::parse(text, path)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("gw.yaml:2:"), "{err}");
        assert!(err.contains("store: url: expected postgres://"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        let text = "store:\n  url: postgres://tw:pw@db/t\n";
        let config = crate::config::Config::parse(text, path).unwrap();
        assert_eq!(
            config.store.location().to_string(),
            "postgres://tw:***@db/t"
        );
    }
}
