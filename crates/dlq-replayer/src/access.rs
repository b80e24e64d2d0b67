//! Who may use the admin API (HTTP and gRPC alike). Two bearer tokens: the admin token
//! may do everything, the read token only read. With either configured, every read needs
//! one of them; with neither, reads stay open (a local demo) but a payload is never sent
//! to such an unauthenticated caller, and mutations are refused.

use enrich_common::config::DlqReplayerSettings;

/// The configured tokens.
#[derive(Clone)]
pub struct Access {
    admin: Option<String>,
    read: Option<String>,
}

/// Who a reader turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// It carried a token: it may see payloads.
    Authenticated,
    /// No token is configured at all: open reads, without payloads.
    Anonymous,
}

impl Access {
    pub fn new(admin: Option<&str>, read: Option<&str>) -> Self {
        let set = |t: Option<&str>| t.filter(|t| !t.is_empty()).map(str::to_string);
        Self { admin: set(admin), read: set(read) }
    }

    pub fn from_settings(s: &DlqReplayerSettings) -> Self {
        Self::new(s.admin_token.as_ref().map(|t| t.expose()), s.read_token.as_ref().map(|t| t.expose()))
    }

    /// No token at all: reads are open.
    pub fn is_open(&self) -> bool {
        self.admin.is_none() && self.read.is_none()
    }

    /// What the service says once at start about how it is protected.
    pub fn announce(&self) {
        if self.is_open() {
            tracing::warn!(
                "no dlq_replayer.admin_token nor read_token: admin reads are open to anyone who can reach the port \
                 (payloads are withheld), replay and discard are refused; set the tokens outside a demo"
            );
        } else if self.admin.is_none() {
            tracing::warn!("no dlq_replayer.admin_token: replay, discard, pause and resume are refused (401)");
        }
    }

    /// A read: with a token configured, the read or the admin token.
    pub fn read(&self, authorization: Option<&str>) -> Result<Reader, &'static str> {
        if self.is_open() {
            return Ok(Reader::Anonymous);
        }
        let given = bearer(authorization).ok_or("missing bearer token")?;
        if [&self.read, &self.admin].into_iter().flatten().any(|t| constant_time_eq(given, t.as_bytes())) {
            Ok(Reader::Authenticated)
        } else {
            Err("wrong bearer token")
        }
    }

    /// A mutation: the admin token only.
    pub fn admin(&self, authorization: Option<&str>) -> Result<(), &'static str> {
        let Some(token) = &self.admin else {
            return Err("no admin token is configured (dlq_replayer.admin_token)");
        };
        match bearer(authorization) {
            Some(given) if constant_time_eq(given, token.as_bytes()) => Ok(()),
            Some(_) => Err("wrong bearer token"),
            None => Err("missing bearer token"),
        }
    }
}

fn bearer(authorization: Option<&str>) -> Option<&[u8]> {
    authorization.and_then(|v| v.strip_prefix("Bearer ")).map(str::as_bytes)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "Bearer admin-token-0123456789";
    const READ: &str = "Bearer read-token-0123456789";

    #[test]
    fn each_token_does_what_it_is_for() {
        let both = Access::new(Some("admin-token-0123456789"), Some("read-token-0123456789"));
        assert_eq!(both.read(Some(READ)), Ok(Reader::Authenticated));
        assert_eq!(both.read(Some(ADMIN)), Ok(Reader::Authenticated), "the admin token reads too");
        assert!(both.read(None).is_err() && both.read(Some("Bearer nope")).is_err());
        assert!(both.admin(Some(ADMIN)).is_ok());
        assert!(both.admin(Some(READ)).is_err(), "the read token cannot mutate");
        let admin_only = Access::new(Some("admin-token-0123456789"), None);
        assert!(admin_only.read(None).is_err(), "a token configured closes the reads");
        assert_eq!(admin_only.read(Some(ADMIN)), Ok(Reader::Authenticated));
        let open = Access::new(None, Some(""));
        assert_eq!(open.read(None), Ok(Reader::Anonymous));
        assert!(open.admin(Some(ADMIN)).is_err(), "no admin token: mutations refused");
    }
}
